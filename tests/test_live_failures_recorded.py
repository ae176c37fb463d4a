"""Every request leaves one record, whatever happened to it (live server, OTLP export, Redis store).

An unexpected error (here: a foreign value where the Redis store expects its own record, so the store
script fails with a plain WRONGTYPE reply: a bug in the data, not an outage) is answered with the
``internal_error`` envelope and its decision id, and still gets one audit line, a metric with its code and
an ended span with error status. Requests refused before the model is known (401, bad JSON) get a span too.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from conftest import ADMIN_KEY, SUPPORT_KEY, Mock, Proxy, default_config, free_port
from otlp_receiver import OtlpReceiver

REDIS = "redis://127.0.0.1:6379/12"


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def gp(make_proxy: Callable[..., Proxy], mock_upstream: Mock, otlp: OtlpReceiver) -> Proxy:
    cfg = default_config(mock_upstream.url, free_port(), REDIS)
    cfg["telemetry"] = {"audit_log": "audit.log", "exporter": "otlp", "endpoint": f"http://127.0.0.1:{otlp.port}"}
    return make_proxy(config=cfg, env={"OTEL_EXPORTER_OTLP_HEADERS": "", "OTEL_TRACES_EXPORTER": "",
                                       "OTEL_BSP_SCHEDULE_DELAY": "100"})


def _requests_total(gp: Proxy, code: str) -> float:
    total = 0.0
    for line in gp.get("/metrics", key=None).text.splitlines():
        if line.startswith("guardproxy_requests_total{") and f'code="{code}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _server_span(otlp: OtlpReceiver, decision_id: str) -> Any:
    def find(spans: list[tuple[dict[str, Any], Any]]) -> Any:
        for _, s in spans:
            for a in s.attributes:
                if a.key == "guardproxy.decision.id" and a.value.string_value == decision_id:
                    return s
        return None
    otlp.wait_for(lambda spans: find(spans) is not None)
    return find(otlp.spans())


def test_an_unexpected_error_leaves_envelope_audit_metric_and_span(gp: Proxy, otlp: OtlpReceiver) -> None:
    idem = uuid.uuid4().hex
    scoped = f"{len('support-agent')}:support-agent:{idem}"
    r12 = redis.Redis.from_url(REDIS)
    r12.set(f"gp:{{i:{scoped}}}", "not a hash", ex=300)  # the store's own record was expected here
    before = _requests_total(gp, "internal_error")
    r = gp.post("/v1/chat/completions", key=SUPPORT_KEY, headers={"idempotency-key": idem},
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 500
    err = r.json()["error"]
    did = r.headers["x-guardproxy-decision-id"]
    assert err["code"] == "internal_error" and err["decision_id"] == did
    assert "WRONGTYPE" not in r.text  # details stay in the log
    line = gp.audit_for(did)
    assert (line["status"], line["error_code"]) == (500, "internal_error")
    assert _requests_total(gp, "internal_error") == before + 1
    span = _server_span(otlp, did)
    assert span.end_time_unix_nano > 0 and span.status.code == span.status.STATUS_CODE_ERROR


@pytest.mark.parametrize(("key", "body", "code"), [
    ("sk-not-a-key", b'{"model": "gpt-4o-mini", "messages": []}', "invalid_api_key"),
    (SUPPORT_KEY, b'{"model": "gpt-4o-mini", "messages": [}', "invalid_json"),
])
def test_requests_refused_before_the_model_is_known_get_a_span(gp: Proxy, otlp: OtlpReceiver, key: str,
                                                               body: bytes, code: str) -> None:
    r = gp.post("/v1/chat/completions", key=key, content=body, headers={"content-type": "application/json"})
    assert r.json()["error"]["code"] == code
    did = r.headers["x-guardproxy-decision-id"]
    span = _server_span(otlp, did)
    assert span.kind == span.SPAN_KIND_SERVER and span.status.code == span.status.STATUS_CODE_ERROR
    assert gp.audit_for(did)["error_code"] == code


def test_an_unexpected_error_on_another_route_leaves_envelope_metric_and_audit(gp: Proxy) -> None:
    tag = uuid.uuid4().hex[:8]
    redis.Redis.from_url(REDIS).set(f"gp:{{b}}:c:key:broken-{tag}:day:x", "not a hash", ex=300)
    before = _requests_total(gp, "internal_error")
    r = gp.get(f"/v1/spend?prefix=key:broken-{tag}", key=ADMIN_KEY)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "WRONGTYPE" not in r.text
    assert _requests_total(gp, "internal_error") == before + 1
    assert {"event": "internal_error", "route": "/v1/spend"}.items() <= gp.audit_lines()[-1].items()
