"""Telemetry end to end: spans, W3C propagation, conversation links, /metrics and an OTLP export.

Most tests build the real app in-process (``build_state`` + ``create_app``) in front of the real
mock upstream started on the same event loop, with an in-memory span exporter, so the exact span
tree can be asserted. One test runs ``guardproxy serve`` as a subprocess exporting OTLP/HTTP to a
receiver in this process that decodes the protobuf ``ExportTraceServiceRequest``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import conftest
import httpx
import pytest
from conftest import ADMIN_KEY, PLAY_KEY, SUPPORT_KEY, Mock, Proxy, default_config, free_port
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from otlp_receiver import OtlpReceiver
from prometheus_client.parser import text_string_to_metric_families

from otel.tracing import Tracing, TracingSettings
from proxy._mock_replies import ScriptedReply
from proxy.app import build_state, create_app
from proxy.config import Config
from proxy.mock_upstream import MockUpstream, start
from proxy.state import AppState
from proxy.tokens import TokenCounter

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
TICKET = json.dumps({"action": "resolve", "reason": "done", "confidence": 0.9,
                     "requires_human_review": False})

# A key-level policy for the playground key: refunds need a human (exercises approvals).
REFUNDS = """
apiVersion: guardproxy/v1
kind: Policy
metadata: {name: refunds}
match: {keys: [playground]}
tools:
  allow:
    issue_refund:
      rules:
        - id: refunds-need-approval
          when: "true"
          action: require_approval
          reason: Every refund needs a human
"""


@dataclass
class App:
    state: AppState
    mock: MockUpstream
    client: httpx.AsyncClient

    def script(self, *replies: dict[str, Any]) -> None:
        self.mock.replies.extend(ScriptedReply.model_validate(r) for r in replies)

    def spans(self) -> list[ReadableSpan]:
        exporter = self.state.telemetry.tracing.memory_exporter
        assert exporter is not None
        return list(exporter.get_finished_spans())

    def upstream_headers(self) -> list[dict[str, str]]:
        return [{k.decode().lower(): v.decode() for k, v in h} for _, h, _ in self.mock.calls]

    async def chat(self, key: str = SUPPORT_KEY, headers: dict[str, str] | None = None,
                   **body: Any) -> httpx.Response:
        body.setdefault("messages", [{"role": "user", "content": "hello"}])
        return await self.client.post("/v1/chat/completions", json=body,
                                      headers={"authorization": f"Bearer {key}", **(headers or {})})

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        resp = await self.client.get("/metrics")
        assert resp.status_code == 200
        return parse_metrics(resp.text)


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


@asynccontextmanager
async def running_app(tmp: Path, *, exporter: str = "memory", extra_policies: dict[str, str] | None = None,
                      telemetry: dict[str, Any] | None = None,
                      prices: dict[str, dict[str, float]] | None = None) -> AsyncIterator[App]:
    mock = MockUpstream()
    server, port = await start("127.0.0.1", 0, app=mock)
    (tmp / "policies").mkdir(parents=True)
    for name, text in {**conftest.shipped_policies(), **(extra_policies or {})}.items():
        (tmp / "policies" / name).write_text(text)
    cfg = default_config(f"http://127.0.0.1:{port}/v1", 0)
    cfg["server"]["watch_policies"] = False
    cfg["telemetry"] = {"audit_log": str(tmp / "audit.log"), **(telemetry or {})}
    for route in cfg["models"]:
        if route["name"] in (prices or {}):
            route["price"] = (prices or {})[route["name"]]
    config = Config.model_validate({**cfg, "base_dir": str(tmp)})
    state = build_state(config)
    if exporter == "memory":
        state.telemetry.tracing = Tracing(TracingSettings(exporter="memory", capture_content=bool(
            (telemetry or {}).get("capture_content"))))
    app = create_app(config, state=state)
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://guardproxy") as client:
            yield App(state, mock, client)
    finally:
        mock.close_connections()
        server.close()
        await server.wait_closed()


def run(tmp: Path, scenario: Callable[[App], Any], **kw: Any) -> Any:
    async def go() -> Any:
        async with running_app(tmp, **kw) as app:
            return await scenario(app)

    return asyncio.run(go())


def by_name(spans: list[ReadableSpan], name: str, kind: SpanKind | None = None) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name and (kind is None or s.kind == kind)]


def tool_call(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "arguments": json.dumps(args)}


# --- the span tree ------------------------------------------------------------------------------------


def test_tool_call_request_produces_the_full_span_tree(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "please credit the customer"}]

    async def scenario(app: App) -> tuple[httpx.Response, list[ReadableSpan], list[dict[str, str]]]:
        app.script({"tool_calls": [tool_call("apply_credit", {"customer_id": "c1", "amount": 75}),
                                   tool_call("delete_account", {"customer_id": "c1"}),
                                   tool_call("get_customer_account", {"customer_id": "c1"})],
                    "usage": {"prompt_tokens": 30, "completion_tokens": 12}})
        headers = {"traceparent": TRACEPARENT, "x-guardproxy-conversation-id": "conv-tree"}
        resp = await app.chat(model="gpt-4o-mini", messages=messages, max_tokens=100, temperature=0.9,
                              headers=headers)
        return resp, app.spans(), app.upstream_headers()

    resp, spans, upstream = run(tmp_path, scenario)
    assert resp.status_code == 200, resp.text
    h = resp.headers
    revision, decision_id = h["x-guardproxy-policy-revision"], h["x-guardproxy-decision-id"]
    assert sorted((s.name, s.kind.name) for s in spans) == [
        ("chat gpt-4o-mini", "CLIENT"), ("chat gpt-4o-mini", "SERVER"), ("policy.request", "INTERNAL"),
        ("policy.response", "INTERNAL")]
    (server,) = by_name(spans, "chat gpt-4o-mini", SpanKind.SERVER)
    # The caller's trace is continued: same trace id, the caller's span is the parent.
    assert all(f"{s.context.trace_id:032x}" == TRACE_ID for s in spans)
    assert server.parent is not None and f"{server.parent.span_id:016x}" == PARENT_ID
    children = [s for s in spans if s is not server]
    assert all(s.parent is not None and s.parent.span_id == server.context.span_id for s in children)

    prompt_tokens = TokenCounter().count_messages("gpt-4o-mini", messages)
    estimate_micro = -(-(prompt_tokens * 150_000 + 100 * 600_000) // 1_000_000)  # $0.15/M in, $0.60/M out
    # Actual: 30 x $0.15/M + 12 x $0.60/M = 11.7 µ$, rounded up to 12 µ$.
    assert h["x-guardproxy-cost-usd"] == "0.000012"
    assert dict(server.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.usage.input_tokens": 30,
        "gen_ai.usage.output_tokens": 12,
        "gen_ai.response.finish_reasons": ("tool_calls",),
        "gen_ai.conversation.id": "conv-tree",
        "guardproxy.decision.id": decision_id,
        "guardproxy.policy.revision": revision,
        "guardproxy.rule_ids": ("support-agent:models.params.temperature", "credit-over-50-needs-human",
                                "org-base:tools"),
        "guardproxy.actions": ("clamped:temperature", "escalated:apply_credit", "tool_denied:delete_account"),
        "guardproxy.shadow.would": (),
        "guardproxy.cost.estimated_usd": estimate_micro / 1_000_000,
        "guardproxy.cost.actual_usd": 0.000012,
        "http.request.method": "POST",
        "http.route": "/v1/chat/completions",
        "http.response.status_code": 200,
    }
    assert h["x-guardproxy-actions"] == (
        "clamped:temperature,escalated:apply_credit,tool_denied:delete_account")
    assert [(e.name, dict(e.attributes or {})) for e in server.events] == [
        ("guardproxy.tool_call", {"tool": "apply_credit", "outcome": "escalated",
                                  "rule": "credit-over-50-needs-human",
                                  "reason": "Credits over $50 always require human review"}),
        ("guardproxy.tool_call", {"tool": "delete_account", "outcome": "denied", "rule": "org-base:tools",
                                  "reason": "tool delete_account is not allowed by policy org-base"}),
        ("guardproxy.tool_call", {"tool": "get_customer_account", "outcome": "allowed", "rule": "",
                                  "reason": ""}),
    ]
    (req,) = by_name(spans, "policy.request")
    assert dict(req.attributes or {}) == {
        "guardproxy.decision.id": decision_id, "guardproxy.policy.revision": revision,
        "guardproxy.rule_ids": ("support-agent:models.params.temperature",),
        "guardproxy.actions": ("clamped:temperature",), "guardproxy.shadow.would": (),
        "guardproxy.decision.effect": "modify"}
    (res,) = by_name(spans, "policy.response")
    assert dict(res.attributes or {}) == {
        "guardproxy.decision.id": decision_id, "guardproxy.policy.revision": revision,
        "guardproxy.rule_ids": ("credit-over-50-needs-human", "org-base:tools"),
        "guardproxy.actions": ("escalated:apply_credit", "tool_denied:delete_account"),
        "guardproxy.shadow.would": (), "guardproxy.decision.effect": "modify"}
    (client,) = by_name(spans, "chat gpt-4o-mini", SpanKind.CLIENT)
    assert dict(client.attributes or {}) == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "guardproxy.upstream.attempt": 1, "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.usage.input_tokens": 30, "gen_ai.usage.output_tokens": 12}
    # The upstream saw the CLIENT span as its parent, in the caller's trace.
    assert [u["traceparent"] for u in upstream] == [f"00-{TRACE_ID}-{client.context.span_id:016x}-01"]
    # Timing nests: the upstream call happens inside the server span.
    times = (server.start_time, client.start_time, client.end_time, server.end_time)
    assert None not in times and sorted(times) == list(times)  # type: ignore[type-var]


def test_a_repair_is_a_second_client_span(tmp_path: Path) -> None:
    async def scenario(app: App) -> tuple[httpx.Response, list[ReadableSpan], list[dict[str, str]]]:
        app.script({"tool_calls": [tool_call("apply_credit", {"customer_id": "c1"})],  # amount missing
                    "usage": {"prompt_tokens": 20, "completion_tokens": 5}},
                   {"tool_calls": [tool_call("apply_credit", {"customer_id": "c1", "amount": 20})],
                    "usage": {"prompt_tokens": 40, "completion_tokens": 6}})
        resp = await app.chat(model="gpt-4o-mini", max_tokens=100, headers={"traceparent": TRACEPARENT})
        return resp, app.spans(), app.upstream_headers()

    resp, spans, upstream = run(tmp_path, scenario)
    assert resp.status_code == 200, resp.text
    call = resp.json()["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call["name"] == "apply_credit"
    assert json.loads(call["arguments"]) == {"customer_id": "c1", "amount": 20}
    clients = sorted(by_name(spans, "chat gpt-4o-mini", SpanKind.CLIENT), key=lambda s: s.start_time or 0)
    attrs_of = [dict(c.attributes or {}) for c in clients]
    assert [a["guardproxy.upstream.attempt"] for a in attrs_of] == [1, 2]
    assert [(a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) for a in attrs_of] == [
        (20, 5), (40, 6)]
    assert [u["traceparent"] for u in upstream] == [
        f"00-{TRACE_ID}-{c.context.span_id:016x}-01" for c in clients]
    (server,) = by_name(spans, "chat gpt-4o-mini", SpanKind.SERVER)
    attrs = server.attributes or {}
    assert attrs["guardproxy.actions"] == ("repair_requested:apply_credit", "repaired:apply_credit")
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (60, 11)
    assert [dict(e.attributes or {})["outcome"] for e in server.events] == ["allowed"]
    assert len(by_name(spans, "policy.response")) == 1


async def server_spans(app: App, n: int) -> list[ReadableSpan]:
    """The first ``n`` SERVER spans; a stream's span ends in a task after the last byte, so wait for it."""
    for _ in range(500):
        found = [s for s in app.spans() if s.kind == SpanKind.SERVER]
        if len(found) >= n:
            return found
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {n} server spans, got {len(found)}")


def test_streamed_request_spans(tmp_path: Path) -> None:
    async def scenario(app: App) -> tuple[list[httpx.Response], list[ReadableSpan]]:
        app.script({"tool_calls": [tool_call("apply_credit", {"customer_id": "c1", "amount": 60})],
                    "usage": {"prompt_tokens": 12, "completion_tokens": 7}},
                   {"content": TICKET, "chunk_chars": 4, "stream_fail_after": 2})
        ok = await app.chat(model="gpt-4o-mini", max_tokens=64, stream=True,
                            headers={"traceparent": TRACEPARENT})
        broken = await app.chat(model="gpt-4o-mini", max_tokens=64, stream=True)
        await server_spans(app, 2)
        return [ok, broken], app.spans()

    (ok, broken), spans = run(tmp_path, scenario)
    assert ok.status_code == broken.status_code == 200
    assert '"escalate_to_human"' in ok.text and '"error"' in broken.text
    servers = sorted(by_name(spans, "chat gpt-4o-mini", SpanKind.SERVER), key=lambda s: s.start_time or 0)
    clients = sorted(by_name(spans, "chat gpt-4o-mini", SpanKind.CLIENT), key=lambda s: s.start_time or 0)
    assert len(servers) == len(clients) == 2
    good, bad = servers
    assert f"{good.context.trace_id:032x}" == TRACE_ID
    a = dict(good.attributes or {})
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (12, 7)
    assert a["gen_ai.response.finish_reasons"] == ("tool_calls",)
    assert a["guardproxy.actions"] == ("escalated:apply_credit",)
    assert [dict(e.attributes or {})["outcome"] for e in good.events] == ["escalated"]
    assert clients[0].parent is not None and clients[0].parent.span_id == good.context.span_id
    c = dict(clients[0].attributes or {})
    assert (c["gen_ai.usage.input_tokens"], c["gen_ai.usage.output_tokens"]) == (12, 7)
    assert clients[0].status.status_code == StatusCode.UNSET
    # The stream that broke midway: both its spans end, marked failed.
    for s in (bad, clients[1]):
        assert s.status.status_code == StatusCode.ERROR
        assert (s.attributes or {})["error.type"] == "upstream_error"


def test_second_turn_links_to_the_first(tmp_path: Path) -> None:
    async def scenario(app: App) -> list[ReadableSpan]:
        conv = {"x-guardproxy-conversation-id": "conv-links"}
        for _ in range(2):
            app.script({"content": TICKET})
            assert (await app.chat(model="gpt-4o-mini", headers=conv)).status_code == 200
        app.script({"content": TICKET})
        assert (await app.chat(model="gpt-4o-mini", headers={"x-guardproxy-conversation-id": "other"})
                ).status_code == 200
        return by_name(app.spans(), "chat gpt-4o-mini", SpanKind.SERVER)

    first, second, other = sorted(run(tmp_path, scenario), key=lambda s: s.start_time)
    assert [(s.attributes or {})["gen_ai.conversation.id"] for s in (first, second, other)] == [
        "conv-links", "conv-links", "other"]
    assert first.links == () and other.links == ()
    assert [link.context.span_id for link in second.links] == [first.context.span_id]
    assert second.links[0].context.trace_id == first.context.trace_id != second.context.trace_id


def test_upstream_failure_marks_the_client_and_server_spans(tmp_path: Path) -> None:
    async def scenario(app: App) -> tuple[httpx.Response, list[ReadableSpan]]:
        app.script({"status": 500, "error_message": "boom"})
        return await app.chat(model="gpt-4o-mini"), app.spans()

    resp, spans = run(tmp_path, scenario)
    assert resp.status_code == 502
    (client,) = by_name(spans, "chat gpt-4o-mini", SpanKind.CLIENT)
    (server,) = by_name(spans, "chat gpt-4o-mini", SpanKind.SERVER)
    for s in (client, server):
        assert s.status.status_code == StatusCode.ERROR
        assert (s.attributes or {})["error.type"] == "upstream_error"
    assert (server.attributes or {})["http.response.status_code"] == 502


def test_content_is_captured_only_when_enabled(tmp_path: Path) -> None:
    secret_prompt = "PROMPT-SENTINEL-7f3a"

    async def scenario(app: App) -> ReadableSpan:
        app.script({"content": TICKET})
        resp = await app.chat(model="gpt-4o-mini", messages=[{"role": "user", "content": secret_prompt}])
        assert resp.status_code == 200
        (server,) = by_name(app.spans(), "chat gpt-4o-mini", SpanKind.SERVER)
        return server

    off = run(tmp_path / "off", scenario)
    assert secret_prompt not in json.dumps(dict(off.attributes or {}), default=str)
    assert "gen_ai.input.messages" not in (off.attributes or {})
    assert secret_prompt not in (tmp_path / "off" / "audit.log").read_text()
    on = run(tmp_path / "on", scenario, telemetry={"capture_content": True})
    attrs = on.attributes or {}
    assert json.loads(str(attrs["gen_ai.input.messages"])) == [{"role": "user", "content": secret_prompt}]
    assert json.loads(str(attrs["gen_ai.output.messages"]))[0]["content"] == TICKET


def test_tracing_off_builds_no_sdk_objects_and_sends_no_traceparent(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a span was started with tracing off")

    monkeypatch.setattr(Tracing, "start_server_span", forbidden)
    monkeypatch.setattr(Tracing, "start_child", forbidden)

    async def scenario(app: App) -> tuple[httpx.Response, list[dict[str, str]], AppState]:
        app.script({"tool_calls": [tool_call("apply_credit", {"customer_id": "c1", "amount": 5})]})
        resp = await app.chat(model="gpt-4o-mini", headers={"traceparent": TRACEPARENT})
        return resp, app.upstream_headers(), app.state

    resp, upstream, state = run(tmp_path, scenario, exporter="none")
    assert resp.status_code == 200, resp.text
    tracing = state.telemetry.tracing
    assert not tracing.enabled and tracing._provider is None and tracing._tracer is None
    assert tracing.memory_exporter is None and len(tracing.conversations) == 0
    assert "traceparent" not in upstream[0]
    line = json.loads((tmp_path / "audit.log").read_text().splitlines()[-1])
    assert (line["trace_id"], line["span_id"]) == (None, None)
    assert line["decision_id"] == resp.headers["x-guardproxy-decision-id"]


def test_otel_env_fills_what_the_config_leaves_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")

    def settings(telemetry: dict[str, Any]) -> TracingSettings:
        cfg = default_config("http://127.0.0.1:9/v1", 0)
        cfg["telemetry"] = telemetry
        state = build_state(Config.model_validate({**cfg, "base_dir": str(tmp_path)}))
        state.telemetry.tracing.shutdown()
        return state.telemetry.tracing.settings

    from_env = settings({})
    assert (from_env.exporter, from_env.service_name, from_env.endpoint) == (
        "otlp", "from-env", "http://collector:4318/v1/traces")
    given = settings({"exporter": "none", "service_name": "gp", "endpoint": "http://c:4318/v1/traces"})
    assert (given.exporter, given.service_name, given.endpoint) == ("none", "gp", "http://c:4318/v1/traces")
    monkeypatch.delenv("OTEL_TRACES_EXPORTER")
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    default = settings({})
    assert (default.exporter, default.service_name) == ("none", "guardproxy")


# --- /metrics ---------------------------------------------------------------------------------------


def test_metrics_move_for_allowed_blocked_escalated_downgraded_and_over_budget(tmp_path: Path) -> None:
    # Upstream usage is believed only up to the bounds the proxy sent (max_tokens), so the budget is filled
    # with expensive output tokens: $1000 per million output tokens, $1 per million input tokens.
    price = {"input_per_mtok": 1, "output_per_mtok": 1000}

    async def scenario(app: App) -> tuple[dict[Any, float], dict[Any, float], list[httpx.Response]]:
        before = await app.metrics()
        rs = []
        # allowed tool call, a blocked one (denied tool), an escalated one: 10 + 5 x 1000 = 5010 µ$ each
        app.script({"tool_calls": [tool_call("get_customer_account", {"customer_id": "c1"})],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5}})
        rs.append(await app.chat(model="gpt-4o-mini", max_tokens=40))
        app.script({"tool_calls": [tool_call("delete_account", {"customer_id": "c1"})],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5}})
        rs.append(await app.chat(model="gpt-4o-mini", max_tokens=40))
        app.script({"tool_calls": [tool_call("apply_credit", {"customer_id": "c1", "amount": 80})],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5}})
        rs.append(await app.chat(model="gpt-4o-mini", max_tokens=40, temperature=0.9))
        # One conversation: nine turns of 10 + 49 x 1000 = 49010 µ$ spend 88% of its $0.50, so the 0.8
        # ladder step downgrades the tenth; after it the conversation has no room for another turn.
        conv = {"x-guardproxy-conversation-id": "conv-budget"}
        for _ in range(10):
            app.script({"content": TICKET, "usage": {"prompt_tokens": 10, "completion_tokens": 49}})
            rs.append(await app.chat(model="gpt-4o", max_tokens=49, headers=conv))
        # ... which is now over its ceiling: refused before any upstream call.
        rs.append(await app.chat(model="gpt-4o", max_tokens=49, headers=conv))
        return before, await app.metrics(), rs

    before, after, rs = run(tmp_path, scenario, prices={"gpt-4o": price, "gpt-4o-mini": price})
    assert [r.status_code for r in rs] == [200] * 13 + [429], [r.text for r in rs]
    assert [r.headers["x-guardproxy-model"] for r in rs[3:13]] == ["gpt-4o"] * 9 + ["gpt-4o-mini"]
    assert rs[12].headers["x-guardproxy-actions"] == "downgraded:gpt-4o->gpt-4o-mini"
    assert rs[13].json()["error"]["code"] == "budget_exceeded"

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    route = "/v1/chat/completions"
    assert delta("guardproxy_requests_total", route=route, model="gpt-4o-mini", status="200", code="none") == 3
    assert delta("guardproxy_requests_total", route=route, model="gpt-4o", status="200", code="none") == 10
    assert delta("guardproxy_requests_total", route=route, model="gpt-4o", status="429",
                 code="budget_exceeded") == 1
    assert delta("guardproxy_tool_calls_total", tool="get_customer_account", outcome="allowed") == 1
    # delete_account is named by no policy (only the delete_* glob), so like any tool name a model makes
    # up it is counted under "other": label values stay bounded by the policies.
    assert delta("guardproxy_tool_calls_total", tool="other", outcome="denied") == 1
    assert delta("guardproxy_tool_calls_total", tool="apply_credit", outcome="escalated") == 1
    enforce = {"mode": "enforce"}
    assert delta("guardproxy_decisions_total", action="tool_denied", rule="org-base:tools", **enforce) == 1
    assert delta("guardproxy_decisions_total", action="escalated", rule="credit-over-50-needs-human",
                 **enforce) == 1
    assert delta("guardproxy_decisions_total", action="clamped",
                 rule="support-agent:models.params.temperature", **enforce) == 1
    assert delta("guardproxy_decisions_total", action="downgraded", rule="none", **enforce) == 1
    assert delta("guardproxy_downgrades_total", from_model="gpt-4o", to_model="gpt-4o-mini") == 1
    assert delta("guardproxy_budget_refusals_total", scope="conversation") == 1
    # Spend is exact. gpt-4o-mini: 3 x 5010 µ$ plus the downgraded turn (49010 µ$); gpt-4o: 9 x 49010 µ$.
    cost = {"team": "support", "key": "support-agent"}
    assert sample(after, "guardproxy_cost_usd_total", model="gpt-4o-mini", **cost) == 64_040 / 1_000_000
    assert sample(after, "guardproxy_cost_usd_total", model="gpt-4o", **cost) == 441_090 / 1_000_000
    assert delta("guardproxy_tokens_total", model="gpt-4o-mini", direction="input", **cost) == 40
    assert delta("guardproxy_tokens_total", model="gpt-4o-mini", direction="output", **cost) == 64
    assert delta("guardproxy_tokens_total", model="gpt-4o", direction="output", **cost) == 441
    assert {dict(k[1])["tool"] for k in after if k[0] == "guardproxy_tool_calls_total"} == {
        "get_customer_account", "other", "apply_credit"}


def test_approvals_pending_feedback_and_override_ratio(tmp_path: Path) -> None:
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}

    async def scenario(app: App) -> list[dict[Any, float]]:
        seen = [await app.metrics()]
        decisions = []
        for n in range(2):
            app.script({"tool_calls": [tool_call("issue_refund", {"order": n})]})
            resp = await app.chat(PLAY_KEY, model="gpt-4o-mini")
            assert resp.status_code == 200 and resp.headers["x-guardproxy-approval-id"].startswith("apr_")
            decisions.append(resp.headers["x-guardproxy-decision-id"])
        seen.append(await app.metrics())
        pending = (await app.client.get("/admin/approvals?status=pending", headers=admin)).json()["data"]
        assert len(pending) == 2
        ok = await app.client.post(f"/admin/approvals/{pending[0]['id']}/approve", headers=admin)
        no = await app.client.post(f"/admin/approvals/{pending[1]['id']}/reject", headers=admin)
        assert ok.status_code == no.status_code == 200
        seen.append(await app.metrics())
        play = {"authorization": f"Bearer {PLAY_KEY}"}
        # Three posts on two decisions: the second verdict on decisions[1] replaces its first.
        for did, outcome in ((decisions[0], "overridden"), (decisions[1], "overridden"), (decisions[1], "confirmed")):
            r = await app.client.post("/v1/feedback", headers=play, json={"decision_id": did, "outcome": outcome})
            assert r.status_code == 200
        bad = await app.client.post("/v1/feedback", headers=play,
                                    json={"decision_id": decisions[0], "outcome": "meh"})
        assert bad.status_code == 400
        seen.append(await app.metrics())
        return seen

    start, held, decided, fed = run(tmp_path, scenario, extra_policies={"refunds.yaml": REFUNDS})
    g = "guardproxy_approvals_pending"
    ratio = "guardproxy_human_override_ratio"
    assert (start[(g, ())], held[(g, ())], decided[(g, ())]) == (0, 2, 0)
    assert sample(held, "guardproxy_approvals_total", outcome="requested") == 2
    assert sample(held, "guardproxy_tool_calls_total", tool="issue_refund", outcome="held") == 2
    assert sample(held, "guardproxy_decisions_total", action="approval_requested",
                  rule="refunds-need-approval", mode="enforce") == 2
    assert start[(ratio, ())] == 0.0
    assert decided[(ratio, ())] == 0.5  # 1 rejected of 2 decided
    assert sample(fed, "guardproxy_feedback_total", outcome="overridden") == 2
    assert sample(fed, "guardproxy_feedback_total", outcome="confirmed") == 1
    assert sample(fed, "guardproxy_feedback_retracted_total", outcome="overridden") == 1
    # (1 rejected + 1 overridden decision) / (2 decided approvals + 2 decisions with a verdict)
    assert fed[(ratio, ())] == pytest.approx(2 / 4)


# --- OTLP/HTTP export from the live server ------------------------------------------------------------


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


def attr_values(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in span.attributes:
        v = a.value
        kind = v.WhichOneof("value")
        if kind == "array_value":
            out[a.key] = [getattr(x, x.WhichOneof("value")) for x in v.array_value.values]
        else:
            out[a.key] = getattr(v, kind)
    return out


def test_live_serve_exports_spans_over_otlp_http(make_proxy: Callable[..., Proxy], mock_upstream: Mock,
                                                 otlp: OtlpReceiver) -> None:
    cfg = default_config(mock_upstream.url, free_port())
    cfg["telemetry"] = {"exporter": "otlp", "endpoint": f"http://127.0.0.1:{otlp.port}",
                        "service_name": "gp-otel-test"}
    proxy = make_proxy(config=cfg, env={"OTEL_EXPORTER_OTLP_HEADERS": "", "OTEL_TRACES_EXPORTER": ""})
    mock_upstream.reset()
    mock_upstream.script({"tool_calls": [tool_call("delete_account", {"customer_id": "c1"})],
                          "usage": {"prompt_tokens": 8, "completion_tokens": 4}})
    resp = proxy.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "max_tokens": 64, "messages": [
        {"role": "user", "content": "hi"}]}, headers={"traceparent": TRACEPARENT})
    assert resp.status_code == 200, resp.text
    decision_id = resp.headers["x-guardproxy-decision-id"]
    otlp.wait_for(lambda spans: {s.name for _, s in spans} >= {"chat gpt-4o-mini", "policy.request",
                                                               "policy.response"} and len(spans) >= 4)
    assert set(otlp.paths) == {"/v1/traces"}
    spans = otlp.spans()
    assert {res["service.name"] for res, _ in spans} == {"gp-otel-test"}
    assert {s.trace_id.hex() for _, s in spans} == {TRACE_ID}
    servers = [s for _, s in spans if s.kind == s.SPAN_KIND_SERVER]
    (server,) = servers
    assert server.name == "chat gpt-4o-mini" and server.parent_span_id.hex() == PARENT_ID
    a = attr_values(server)
    assert a["guardproxy.decision.id"] == decision_id
    assert a["gen_ai.usage.input_tokens"] == 8 and a["gen_ai.usage.output_tokens"] == 4
    assert a["guardproxy.actions"] == ["tool_denied:delete_account"]
    assert [(e.name, attr_values(e)["outcome"]) for e in server.events] == [
        ("guardproxy.tool_call", "denied")]
    (client,) = [s for _, s in spans if s.kind == s.SPAN_KIND_CLIENT]
    assert client.parent_span_id == server.span_id
    assert mock_upstream.calls()[-1]["headers"]["traceparent"] == f"00-{TRACE_ID}-{client.span_id.hex()}-01"
