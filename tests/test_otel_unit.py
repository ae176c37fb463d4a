"""Unit tests for otel/: spans and propagation, metrics exposition, audit log."""

from __future__ import annotations

import io
import json
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import INVALID_SPAN, SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from otel import AuditLog, Metrics, Tracing, TracingSettings, mark_error, redact, semconv, span_ids
from otel.tracing import ConversationLinks, traces_url

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def tracing() -> Iterator[Tracing]:
    t = Tracing(TracingSettings(exporter="memory", service_name="gp-test"))
    yield t
    t.shutdown()


def finished(t: Tracing) -> list[ReadableSpan]:
    assert t.memory_exporter is not None
    return list(t.memory_exporter.get_finished_spans())


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


# --- tracing -------------------------------------------------------------------------------------


def test_spans_carry_genai_and_guardproxy_attribute_names(tracing: Tracing) -> None:
    server = tracing.start_server_span(
        "chat gpt-4o",
        attributes={semconv.GEN_AI_OPERATION_NAME: "chat", semconv.GEN_AI_REQUEST_MODEL: "gpt-4o"},
    )
    server.set_attributes(
        {
            semconv.GUARDPROXY_DECISION_ID: "dec-1",
            semconv.GUARDPROXY_POLICY_REVISION: "rev-abc",
            semconv.GUARDPROXY_RULE_IDS: ["deny-shell", "cap-cost"],
            semconv.GUARDPROXY_ACTIONS: ["strip_tool"],
            semconv.GUARDPROXY_COST_ESTIMATED_USD: 0.0123,
            semconv.GUARDPROXY_COST_ACTUAL_USD: 0.011,
            semconv.GUARDPROXY_DOWNGRADED_FROM: "gpt-4o",
            semconv.GUARDPROXY_COMPRESSED_TOKENS: 120,
            semconv.GUARDPROXY_DEGRADED: False,
            semconv.GUARDPROXY_SHADOW_WOULD: ["deny"],
        }
    )
    upstream = tracing.start_child(
        "chat gpt-4o-mini",
        parent=server,
        kind=SpanKind.CLIENT,
        attributes={semconv.GEN_AI_PROVIDER_NAME: "openai"},
    )
    upstream.set_attributes(
        {
            semconv.GEN_AI_RESPONSE_MODEL: "gpt-4o-mini-2024-07-18",
            semconv.GEN_AI_USAGE_INPUT_TOKENS: 42,
            semconv.GEN_AI_USAGE_OUTPUT_TOKENS: 7,
            semconv.GEN_AI_RESPONSE_FINISH_REASONS: ["stop"],
        }
    )
    upstream.end()
    server.end()

    child, parent = finished(tracing)
    assert parent.name == "chat gpt-4o" and parent.kind is SpanKind.SERVER
    assert child.kind is SpanKind.CLIENT
    assert child.parent is not None and child.parent.span_id == parent.context.span_id
    assert child.context.trace_id == parent.context.trace_id
    assert parent.resource.attributes["service.name"] == "gp-test"
    # literal names, so a typo in semconv.py fails here
    assert attrs(parent) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o",
        "guardproxy.decision.id": "dec-1",
        "guardproxy.policy.revision": "rev-abc",
        "guardproxy.rule_ids": ("deny-shell", "cap-cost"),
        "guardproxy.actions": ("strip_tool",),
        "guardproxy.cost.estimated_usd": 0.0123,
        "guardproxy.cost.actual_usd": 0.011,
        "guardproxy.downgraded_from": "gpt-4o",
        "guardproxy.compressed_tokens": 120,
        "guardproxy.degraded": False,
        "guardproxy.shadow.would": ("deny",),
    }
    assert attrs(child) == {
        "gen_ai.provider.name": "openai",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
        "gen_ai.usage.input_tokens": 42,
        "gen_ai.usage.output_tokens": 7,
        "gen_ai.response.finish_reasons": ("stop",),
    }


def test_inbound_traceparent_is_continued(tracing: Tracing) -> None:
    ctx = tracing.extract_context({"traceparent": TRACEPARENT, "tracestate": "vendor=abc"})
    server = tracing.start_server_span("chat", ctx)
    child = tracing.start_child("upstream", parent=server, kind=SpanKind.CLIENT)
    child.end()
    server.end()

    spans = {s.name: s for s in finished(tracing)}
    assert {f"{s.context.trace_id:032x}" for s in spans.values()} == {TRACE_ID}
    assert spans["chat"].parent is not None
    assert f"{spans['chat'].parent.span_id:016x}" == PARENT_ID
    assert spans["chat"].parent.is_remote
    assert spans["chat"].context.trace_state.get("vendor") == "abc"


def test_extract_is_case_insensitive_on_plain_dicts(tracing: Tracing) -> None:
    ctx = tracing.extract_context({"Traceparent": TRACEPARENT})
    span = tracing.start_server_span("chat", ctx)
    span.end()
    assert f"{finished(tracing)[0].context.trace_id:032x}" == TRACE_ID


def test_inject_writes_the_upstream_spans_context(tracing: Tracing) -> None:
    ctx = tracing.extract_context({"traceparent": TRACEPARENT, "tracestate": "vendor=abc"})
    server = tracing.start_server_span("chat", ctx)
    client = tracing.start_child("upstream", parent=server, kind=SpanKind.CLIENT)
    headers = {"content-type": "application/json"}
    tracing.inject(headers, client)
    client.end()
    server.end()

    ids = span_ids(client)
    assert ids is not None
    assert headers["traceparent"] == f"00-{TRACE_ID}-{ids[1]}-01"
    assert headers["tracestate"] == "vendor=abc"
    assert headers["content-type"] == "application/json"


def test_unsampled_inbound_trace_records_nothing(tracing: Tracing) -> None:
    ctx = tracing.extract_context({"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"})
    server = tracing.start_server_span("chat", ctx)
    tracing.start_child("upstream", parent=server).end()
    server.end()
    assert not server.is_recording()
    assert finished(tracing) == []


def test_each_turn_links_to_the_previous_turn(tracing: Tracing) -> None:
    first = tracing.start_server_span("turn", conversation_id="conv-1")
    first.end()
    other = tracing.start_server_span("turn", conversation_id="conv-2")
    other.end()
    second = tracing.start_server_span("turn", conversation_id="conv-1")
    second.end()

    s1, s_other, s2 = finished(tracing)
    assert list(s1.links) == [] and list(s_other.links) == []
    assert [link.context for link in s2.links] == [s1.context]
    assert attrs(s2)["gen_ai.conversation.id"] == "conv-1"
    assert tracing.conversations.previous("conv-1") == s2.context


def test_conversation_links_are_a_bounded_lru() -> None:
    links = ConversationLinks(maxsize=2)
    a, b, c = (trace.SpanContext(1, n, is_remote=False) for n in (1, 2, 3))
    links.remember("a", a)
    links.remember("b", b)
    assert links.previous("a") == a  # touch: "b" is now the oldest
    links.remember("c", c)
    assert len(links) == 2
    assert links.previous("b") is None
    assert links.previous("a") == a and links.previous("c") == c


def test_disabled_tracing_builds_nothing_and_records_nothing() -> None:
    t = Tracing(TracingSettings(exporter="none"))
    assert t.enabled is False and t.memory_exporter is None and t._provider is None
    assert t.extract_context({"traceparent": TRACEPARENT}) is None
    span = t.start_server_span("chat", None, {"a": 1}, conversation_id="conv-1")
    assert span is INVALID_SPAN and not span.is_recording()
    assert t.start_child("upstream", parent=span) is INVALID_SPAN
    headers: dict[str, str] = {}
    t.inject(headers, span)
    assert headers == {}
    assert span_ids(span) is None
    assert len(t.conversations) == 0
    t.shutdown()


def test_shutdown_stops_recording_and_never_touches_the_global_provider() -> None:
    before = trace.get_tracer_provider()
    t = Tracing(TracingSettings(exporter="memory"))
    t.start_server_span("kept").end()
    t.shutdown()
    t.shutdown()  # idempotent
    assert t.start_server_span("dropped") is INVALID_SPAN
    assert t.memory_exporter is not None
    assert [s.name for s in t.memory_exporter.get_finished_spans()] == ["kept"]
    assert trace.get_tracer_provider() is before
    assert t._provider is None


def test_mark_error_and_content_capture() -> None:
    quiet = Tracing(TracingSettings(exporter="memory"))
    loud = Tracing(TracingSettings(exporter="memory", capture_content=True))
    for t in (quiet, loud):
        span = t.start_server_span("chat")
        t.record_content(span, semconv.GEN_AI_INPUT_MESSAGES, [{"role": "user", "content": "hi"}])
        mark_error(span, "upstream_timeout", "took too long")
        span.end()
        t.shutdown()
    (q,), (lo,) = finished(quiet), finished(loud)
    assert "gen_ai.input.messages" not in attrs(q)
    assert json.loads(attrs(lo)["gen_ai.input.messages"]) == [{"role": "user", "content": "hi"}]
    assert q.status.status_code is StatusCode.ERROR and q.status.description == "took too long"
    assert attrs(q)["error.type"] == "upstream_timeout"


def test_console_exporter_writes_to_the_given_stream() -> None:
    out = io.StringIO()
    t = Tracing(TracingSettings(exporter="console"), console_out=out)
    t.start_server_span("chat").end()
    t.shutdown()
    assert json.loads(out.getvalue())["name"] == "chat"


def test_settings_from_env_fill_only_what_config_leaves_out() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=acme,authorization=Bearer%20t0k",
        "OTEL_SERVICE_NAME": "from-env",
        "OTEL_TRACES_EXPORTER": "otlp",
    }
    s = TracingSettings.from_env({"sample_ratio": 0.5, "endpoint": None}, environ=env)
    assert s == TracingSettings(
        exporter="otlp",
        endpoint="http://collector:4318/v1/traces",
        headers={"x-tenant": "acme", "authorization": "Bearer t0k"},
        service_name="from-env",
        sample_ratio=0.5,
    )
    env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = "http://traces:9999/custom"
    assert TracingSettings.from_env({}, environ=env).endpoint == "http://traces:9999/custom"
    cfg = {"exporter": "memory", "endpoint": "http://cfg:4318", "headers": {"k": "v"}, "service_name": "cfg"}
    s = TracingSettings.from_env(cfg, environ=env)
    assert (s.exporter, s.endpoint, s.headers, s.service_name) == (
        "memory",
        "http://cfg:4318",
        {"k": "v"},
        "cfg",
    )
    assert TracingSettings.from_env(None, environ={}) == TracingSettings()


def test_settings_validate() -> None:
    with pytest.raises(ValueError, match="exporter"):
        TracingSettings(exporter="jaeger")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sample_ratio"):
        TracingSettings(sample_ratio=1.5)
    with pytest.raises(TypeError):
        TracingSettings.from_env({"exporterr": "otlp"}, environ={})


def test_traces_url() -> None:
    assert traces_url(None) == "http://localhost:4318/v1/traces"
    assert traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert traces_url("https://c/otlp/v1/traces") == "https://c/otlp/v1/traces"


def test_otlp_exporter_posts_protobuf_with_headers() -> None:
    received: list[tuple[str, dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        t = Tracing(
            TracingSettings(
                exporter="otlp", endpoint=f"http://127.0.0.1:{port}", headers={"x-tenant": "acme"}
            )
        )
        span = t.start_server_span("chat", attributes={semconv.GEN_AI_REQUEST_MODEL: "gpt-4o"})
        span.end()
        t.shutdown()  # flushes the batch processor
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

    assert len(received) == 1
    path, headers, body = received[0]
    assert path == "/v1/traces"
    assert headers["x-tenant"] == "acme"
    assert headers["content-type"] == "application/x-protobuf"
    request = ExportTraceServiceRequest.FromString(body)
    (resource_spans,) = request.resource_spans
    assert {a.key: a.value.string_value for a in resource_spans.resource.attributes}[
        "service.name"
    ] == "guardproxy"
    (exported,) = resource_spans.scope_spans[0].spans
    assert exported.name == "chat"
    assert {a.key: a.value.string_value for a in exported.attributes} == {"gen_ai.request.model": "gpt-4o"}


# --- metrics -------------------------------------------------------------------------------------


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(m: Metrics) -> Samples:
    body, _ = m.render()
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(all_samples: Samples, name: str, **labels: str) -> float:
    return all_samples[(name, frozenset(labels.items()))]


def test_counters_move_and_unknown_labels_clamp_to_other() -> None:
    m = Metrics(
        models=["gpt-4o", "gpt-4o-mini"], tools=["search"], rules=["deny-shell"], keys=["k1"], teams=["eng"]
    )
    route = "/v1/chat/completions"
    m.observe_request(route, "gpt-4o", 200, 0.2)
    m.observe_request(route, "gpt-4o", 200, 3.0)
    m.observe_request(route, "made-up-model", 403, 0.002)
    m.observe_request("/v1/chat/completions?user=alice bob", None, 502, 0.01)
    m.observe_upstream("gpt-4o", 2.5)
    m.add_usage("eng", "k1", "gpt-4o", 100, 20, 1500)
    m.add_usage("eng", "k1", "gpt-4o", 10, 0, 0)
    m.add_usage("sales", "leaked-key-sk-123", "gpt-4o", 5, 5, 10)
    m.decision("deny", "deny-shell", shadow=False)
    m.decision("deny", "deny-shell", shadow=True)
    m.decision("allow", "user supplied rule name", shadow=False)
    m.tool_call("search", "allowed")
    m.tool_call("rm -rf /", "denied")
    m.tool_call("search", "vaporised")
    m.downgrade("gpt-4o", "gpt-4o-mini")
    m.compression()
    m.repair("fixed")
    m.budget_refusal("team")
    m.set_pending(3)
    m.store_error("reserve")
    m.degraded()
    m.reload("error")

    s = samples(m)
    assert value(s, "guardproxy_requests_total", route=route, model="gpt-4o", status="200", code="none") == 2
    assert value(s, "guardproxy_requests_total", route=route, model="other", status="403", code="none") == 1
    assert value(s, "guardproxy_requests_total", route="other", model="none", status="502", code="none") == 1
    assert value(s, "guardproxy_request_duration_seconds_count", route=route, model="gpt-4o") == 2
    assert value(s, "guardproxy_request_duration_seconds_sum", route=route, model="gpt-4o") == pytest.approx(
        3.2
    )
    assert value(s, "guardproxy_request_duration_seconds_bucket", route=route, model="gpt-4o", le="0.25") == 1
    assert value(s, "guardproxy_request_duration_seconds_bucket", route=route, model="gpt-4o", le="5.0") == 2
    assert value(s, "guardproxy_upstream_duration_seconds_count", model="gpt-4o") == 1
    assert value(s, "guardproxy_tokens_total", team="eng", key="k1", model="gpt-4o", direction="input") == 110
    assert value(s, "guardproxy_tokens_total", team="eng", key="k1", model="gpt-4o", direction="output") == 20
    assert (
        value(s, "guardproxy_tokens_total", team="other", key="other", model="gpt-4o", direction="input") == 5
    )
    assert value(s, "guardproxy_cost_usd_total", team="eng", key="k1", model="gpt-4o") == 0.0015
    assert value(s, "guardproxy_cost_usd_total", team="other", key="other", model="gpt-4o") == 0.00001
    assert value(s, "guardproxy_decisions_total", action="deny", rule="deny-shell", mode="enforce") == 1
    assert value(s, "guardproxy_decisions_total", action="deny", rule="deny-shell", mode="shadow") == 1
    assert value(s, "guardproxy_decisions_total", action="allow", rule="other", mode="enforce") == 1
    assert value(s, "guardproxy_tool_calls_total", tool="search", outcome="allowed") == 1
    assert value(s, "guardproxy_tool_calls_total", tool="other", outcome="denied") == 1
    assert value(s, "guardproxy_tool_calls_total", tool="search", outcome="other") == 1
    assert value(s, "guardproxy_downgrades_total", from_model="gpt-4o", to_model="gpt-4o-mini") == 1
    assert value(s, "guardproxy_compressions_total") == 1
    assert value(s, "guardproxy_repairs_total", outcome="fixed") == 1
    assert value(s, "guardproxy_budget_refusals_total", scope="team") == 1
    assert value(s, "guardproxy_approvals_pending") == 3
    assert value(s, "guardproxy_store_errors_total", op="reserve") == 1
    assert value(s, "guardproxy_degraded_requests_total") == 1
    assert value(s, "guardproxy_policy_reloads_total", result="error") == 1
    # no raw user string reached any label value
    label_values = {v for (_, labels) in s for (_, v) in labels}
    assert not {"made-up-model", "rm -rf /", "sales", "leaked-key-sk-123", "vaporised"} & label_values


def test_spend_is_exact_micro_dollars() -> None:
    m = Metrics(models=["m"], keys=["k"], teams=["t"])
    for _ in range(10):
        m.add_usage("t", "k", "m", 0, 0, 100_000)  # 0.1 USD; ten float additions give 0.9999999999999999
    assert value(samples(m), "guardproxy_cost_usd_total", team="t", key="k", model="m") == 1.0


def test_human_override_ratio() -> None:
    m = Metrics()
    assert m.override_ratio() == 0.0
    assert value(samples(m), "guardproxy_human_override_ratio") == 0.0
    for outcome, n in {"requested": 9, "approved": 3, "rejected": 1, "expired": 5}.items():
        for _ in range(n):
            m.approval(outcome)
    for outcome, n in {"overridden": 1, "confirmed": 3, "bogus": 4}.items():
        for _ in range(n):
            m.feedback(outcome)
    # (1 rejected + 1 overridden) / (4 decided approvals + 4 feedback); expired/requested/bogus excluded
    assert m.override_ratio() == 0.25
    s = samples(m)
    assert value(s, "guardproxy_human_override_ratio") == 0.25
    assert value(s, "guardproxy_approvals_total", outcome="expired") == 5
    assert value(s, "guardproxy_feedback_total", outcome="other") == 4


def test_series_used_by_alerts_exist_before_first_event() -> None:
    s = samples(Metrics())
    for outcome in ("requested", "approved", "rejected", "expired"):
        assert value(s, "guardproxy_approvals_total", outcome=outcome) == 0
    for outcome in ("overridden", "confirmed"):
        assert value(s, "guardproxy_feedback_total", outcome=outcome) == 0


def test_policy_revision_info_keeps_only_the_active_revision() -> None:
    m = Metrics()
    m.reload("ok", "rev1")
    m.reload("ok", "rev2")
    m.reload("error", "rev3")
    s = samples(m)
    revisions = {dict(labels)["revision"] for name, labels in s if name == "guardproxy_policy_revision_info"}
    assert revisions == {"rev2"}
    assert value(s, "guardproxy_policy_reloads_total", result="ok") == 2
    assert value(s, "guardproxy_policy_reloads_total", result="error") == 1


def test_registries_are_per_instance_and_openmetrics_is_negotiated() -> None:
    a, b = Metrics(), Metrics()
    a.compression()
    assert value(samples(a), "guardproxy_compressions_total") == 1
    assert value(samples(b), "guardproxy_compressions_total") == 0
    body, ctype = a.render()
    assert ctype.startswith("text/plain; version=0.0.4")
    body, ctype = a.render("application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


# --- audit ---------------------------------------------------------------------------------------

RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_audit_lines_are_json_one_per_record_and_appended(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    clock = iter([datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC), datetime(2024, 5, 1, 12, 0, 1)])
    first = AuditLog(str(path), clock=lambda: next(clock))
    first.record({"decision_id": "d1", "rule_ids": ["r1"], "cost_micro": 1500})
    first.close()
    first.close()
    second = AuditLog(str(path), clock=lambda: next(clock))
    second.record({"decision_id": "d2", "amount": Decimal("1.5"), "when": datetime(2024, 1, 1, tzinfo=UTC)})
    second.close()

    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3
    one, two = (json.loads(line) for line in lines[:2])
    assert one == {
        "time": "2024-05-01T12:00:00.123Z",
        "decision_id": "d1",
        "rule_ids": ["r1"],
        "cost_micro": 1500,
    }
    assert two["time"] == "2024-05-01T12:00:01.000Z" and two["decision_id"] == "d2"
    assert two["amount"] == "1.5"
    assert list(one)[0] == "time"


def test_audit_time_is_utc_rfc3339_with_ms(tmp_path: Path) -> None:
    plus_two = timezone(timedelta(hours=2))
    log = AuditLog(
        str(tmp_path / "a.jsonl"), clock=lambda: datetime(2024, 5, 1, 14, 0, 0, 5000, tzinfo=plus_two)
    )
    log.record({})
    log.close()
    assert json.loads((tmp_path / "a.jsonl").read_text())["time"] == "2024-05-01T12:00:00.005Z"
    default = AuditLog(str(tmp_path / "b.jsonl"))
    default.record({"k": 1})
    default.close()
    assert RFC3339_MS.fullmatch(json.loads((tmp_path / "b.jsonl").read_text())["time"])


def test_audit_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    for path in (None, "-"):
        log = AuditLog(path)
        log.record({"decision_id": "d", "path": path})
        log.close()
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["path"] for line in out] == [None, "-"]


def test_audit_after_close_refuses(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "a.jsonl"))
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.record({"x": 1})


def test_redact_drops_credentials() -> None:
    headers = {
        "Authorization": "Bearer sk-secret",
        "Proxy-Authorization": "Basic x",
        "api-key": "azure-secret",
        "X-Api-Key": "anthropic-secret",
        "x-goog-api-key": "g",
        "Cookie": "session=1",
        "set-cookie": "a=b",
        "X-Auth-Token": "t",
        "Content-Type": "application/json",
        "User-Agent": "openai-python/1.0",
        "traceparent": TRACEPARENT,
    }
    assert redact(headers) == {
        "Content-Type": "application/json",
        "User-Agent": "openai-python/1.0",
        "traceparent": TRACEPARENT,
    }
    assert "Authorization" in headers  # input untouched


def test_a_replaced_feedback_verdict_counts_once() -> None:
    m = Metrics()
    m.feedback("overridden")
    m.feedback("confirmed", previous="overridden")  # the same decision, verdict replaced
    m.feedback("confirmed", previous="confirmed")  # repeated: nothing changes
    assert m.override_ratio() == 0.0
    s = samples(m)
    assert value(s, "guardproxy_feedback_total", outcome="overridden") == 1
    assert value(s, "guardproxy_feedback_total", outcome="confirmed") == 1
    assert value(s, "guardproxy_feedback_retracted_total", outcome="overridden") == 1
    assert value(s, "guardproxy_feedback_retracted_total", outcome="confirmed") == 0
