"""A broken or hostile upstream answer is a clean 502 that charges nothing (live server).

Every shape the proxy reads is checked before it is read: a body it cannot read is ``502 upstream_error``
with the reservation released (and an idempotent retry runs again, since nothing was stored); usage numbers
are validated before they touch metrics or budgets, and counts beyond what the request allowed are charged
at that bound (``usage_capped``). JSON depth is bounded everywhere, upstream bodies and stream chunks too.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import yaml
from conftest import ADMIN_KEY, Mock, Proxy, default_config, free_port

KEY = "sk-shapes"
CONV = "x-guardproxy-conversation-id"
POLICY = yaml.safe_dump({"apiVersion": "guardproxy/v1", "kind": "Policy", "metadata": {"name": "shapes"},
                         "match": {"keys": ["shapes"]}, "cost": {"per_request_usd": 1}})


@pytest.fixture(scope="module")
def gp(make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> Proxy:
    cfg = default_config(mock_upstream.url, free_port())
    cfg["keys"] = [{"id": "shapes", "key": KEY}]
    return make_proxy(policies={"shapes.yaml": POLICY}, config=cfg)


@pytest.fixture(autouse=True)
def _fresh(mock_upstream: Mock) -> None:
    mock_upstream.reset()


def _ask(gp: Proxy, conv: str, **extra: Any) -> httpx.Response:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, **extra}
    return gp.post("/v1/chat/completions", key=KEY, headers={CONV: conv, **extra.pop("headers", {})}, json=body)


def _spend(gp: Proxy, conv: str) -> list[str]:
    rows = gp.get(f"/v1/spend?prefix=conversation:shapes/{conv}", key=ADMIN_KEY).json()["data"]
    return [r["spend_usd"] for r in rows]


def _nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = {"a": value}
    return value


BROKEN_MESSAGES = [
    {"tool_calls": 5}, {"tool_calls": True}, {"tool_calls": "x"}, {"tool_calls": [5]},
    {"tool_calls": [{"id": "c", "function": []}]}, {"tool_calls": [{"id": "c", "function": {"name": 7}}]},
    {"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {"a": 1}}}]},
    {"function_call": "delete"}, {"function_call": {"name": ["x"]}}, {"content": 5}, {"content": {"a": 1}},
    {"content": [5]}, {"refusal": 1}, {"audio": "x"},
]


@pytest.mark.parametrize("raw", BROKEN_MESSAGES, ids=lambda r: str(r)[:40])
def test_an_unreadable_message_is_a_502_and_charges_nothing(gp: Proxy, mock_upstream: Mock, raw: Any) -> None:
    conv = f"shape-{uuid.uuid4().hex[:8]}"
    mock_upstream.script({"content": "x", "raw_message": raw})
    r = _ask(gp, conv)
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    assert err["code"] == "upstream_error" and err["decision_id"] == r.headers["x-guardproxy-decision-id"]
    assert _spend(gp, conv) == []


def test_a_message_that_is_a_list_or_choices_of_the_wrong_shape_are_502(gp: Proxy, mock_upstream: Mock) -> None:
    for extra in ([{"index": 1, "message": []}], [{"index": 1, "message": {"tool_calls": 5}}], [7]):
        mock_upstream.script({"content": "x", "extra_choices": extra})
        assert _ask(gp, f"shape-{uuid.uuid4().hex[:8]}").status_code == 502


def test_an_idempotent_retry_after_an_unreadable_answer_runs_again(gp: Proxy, mock_upstream: Mock) -> None:
    conv, key = f"shape-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    mock_upstream.script({"content": "x", "raw_message": {"tool_calls": 5}}, {"content": "fine"})
    first = _ask(gp, conv, headers={"idempotency-key": key})
    assert first.status_code == 502
    second = _ask(gp, conv, headers={"idempotency-key": key})
    assert second.status_code == 200 and second.json()["choices"][0]["message"]["content"] == "fine"
    assert "idempotent-replayed" not in second.headers
    assert len(mock_upstream.calls()) == 2


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 10, "completion_tokens": -5}, {"prompt_tokens": -1, "completion_tokens": 1},
    {"prompt_tokens": 1.5, "completion_tokens": 1}, {"prompt_tokens": 1, "completion_tokens": "1"},
    {"prompt_tokens": 1, "completion_tokens": None, "total_tokens": -2}, "lots",
    {"prompt_tokens": 1, "completion_tokens": 1, "completion_tokens_details": {"reasoning_tokens": -9}},
])
@pytest.mark.parametrize("stream", [False, True])
def test_invalid_usage_never_reaches_metrics_or_budgets(gp: Proxy, mock_upstream: Mock, usage: Any,
                                                        stream: bool) -> None:
    conv = f"usage-{uuid.uuid4().hex[:8]}"
    mock_upstream.script({"content": "x", "raw_usage": usage})
    r = _ask(gp, conv, stream=stream)
    if stream:
        assert r.status_code == 200 and b'"code":"upstream_error"' in r.content
    else:
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
    metrics = gp.get("/metrics", key=None).text
    assert "guardproxy_requests_total" in metrics and "-5.0" not in metrics
    # nothing readable came back non-streamed: nothing charged; a stream is charged for the text it read
    if not stream:
        assert _spend(gp, conv) == []


@pytest.mark.parametrize("stream", [False, True])
def test_usage_beyond_the_request_is_charged_at_its_bound(gp: Proxy, mock_upstream: Mock, stream: bool) -> None:
    conv = f"cap-{uuid.uuid4().hex[:8]}"
    # 10^12 output tokens for a request that allowed 100: charged as 100 (and the prompt at its bound)
    mock_upstream.script({"content": "x", "usage": {"prompt_tokens": 10**12, "completion_tokens": 10**12}})
    r = _ask(gp, conv, stream=stream)
    assert r.status_code == 200
    line = gp.audit_for(r.headers["x-guardproxy-decision-id"])
    assert "usage_capped" in line["actions"]
    spent = _spend(gp, conv)
    assert len(spent) == 1 and float(spent[0]) < 0.001  # 100 x $0.60/M plus a small prompt bound


def test_upstream_json_nested_too_deep_is_a_502(gp: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "x", "raw_message": {"metadata": _nested(70)}})
    r = _ask(gp, f"deep-{uuid.uuid4().hex[:8]}")
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"


def test_a_stream_chunk_nested_too_deep_ends_with_an_error_event(gp: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "x", "raw_deltas": [{"extra": _nested(70)}]})
    r = _ask(gp, f"deep-{uuid.uuid4().hex[:8]}", stream=True)
    assert r.status_code == 200 and b'"code":"upstream_error"' in r.content and b"[DONE]" not in r.content


@pytest.mark.parametrize("depth", [65, 100, 253, 254, 600, 1023, 1100])
def test_request_bodies_nested_deeper_than_64_are_400(gp: Proxy, mock_upstream: Mock, depth: int) -> None:
    # written by hand: no JSON library here encodes a document this deep
    nested = '{"a":' * (depth - 1) + '"deep"' + "}" * (depth - 1)
    text = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "metadata": ' + nested + "}"
    r = gp.post("/v1/chat/completions", key=KEY, content=text.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"
    assert mock_upstream.calls() == []


def test_a_body_at_the_depth_limit_is_served(gp: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "ok"})
    r = _ask(gp, f"deep-{uuid.uuid4().hex[:8]}", metadata=_nested(63))
    assert r.status_code == 200


@pytest.mark.parametrize("path", ["/v1/feedback", "/admin/approvals/apr_x/approve"])
def test_other_bodies_are_bounded_too(gp: Proxy, path: str) -> None:
    key = ADMIN_KEY if path.startswith("/admin") else KEY
    r = gp.post(path, key=key, json={"decision_id": "dec_x", "outcome": "confirmed", "note": _nested(100)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
