"""One-time grants (an approval, a once-per-conversation marker) are used only by a delivered answer (live).

A call that consumes a grant is decided before the answer leaves. When the answer then never reaches the
agent (the client left, a later choice is refused, a stream is cut) the grant is given back, so the agent
can ask again; when it is delivered, the grant stays used.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
import yaml
from conftest import ADMIN_KEY, SUPPORT_KEY, Mock, Proxy, default_config, free_port, shipped_policies

CONV = "x-guardproxy-conversation-id"
CREDIT = {"type": "function", "function": {"name": "apply_credit", "parameters": {"type": "object"}}}
SMALL = '{"customer_id": "c-1", "amount": 20}'
HOLDER_KEY = "sk-grants-holder"
HOLD = yaml.safe_dump({
    "apiVersion": "guardproxy/v1", "kind": "Policy", "metadata": {"name": "grants-hold"},
    "match": {"keys": ["grants-holder"]},
    "tools": {"allow": {"transfer_funds": {"rules": [{"id": "big-transfer", "when": "double(args.amount) > 100.0",
                                                       "action": "require_approval"}]}}}})
TRANSFER = {"type": "function", "function": {"name": "transfer_funds", "parameters": {"type": "object"}}}
BIG = '{"to": "acct-1", "amount": 500}'


@pytest.fixture(scope="module")
def gp(make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> Proxy:
    cfg = default_config(mock_upstream.url, free_port())
    cfg["server"].update({"stream_write_timeout_s": 1, "max_stream_buffer_bytes": 32 * 1024 * 1024})
    cfg["keys"].append({"id": "grants-holder", "key": HOLDER_KEY})
    return make_proxy(policies={**shipped_policies(), "hold.yaml": HOLD}, config=cfg)


@pytest.fixture(autouse=True)
def _fresh(mock_upstream: Mock) -> None:
    mock_upstream.reset()


def _body(tools: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "tools": tools, "messages": [{"role": "user", "content": "do it"}], **extra}


def _turn(gp: Proxy, conv: str, key: str = SUPPORT_KEY, tools: list[dict[str, Any]] | None = None,
          **extra: Any) -> httpx.Response:
    return gp.post("/v1/chat/completions", key=key, headers={CONV: conv}, json=_body(tools or [CREDIT], **extra))


def _names(r: httpx.Response) -> list[str]:
    return [c["function"]["name"] for c in r.json()["choices"][0]["message"].get("tool_calls") or ()]


def _leave_early(gp: Proxy, conv: str, key: str, body: dict[str, Any]) -> None:
    """Send the request and go away before the (slow) answer is ready."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gp.url + "/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.3),
                   headers={"authorization": f"Bearer {key}", CONV: conv})


def _wait_audit(gp: Proxy, *needles: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in (gp.dir / "audit.log").read_text().splitlines():
            if all(n in line for n in needles):
                return line
        time.sleep(0.05)
    raise AssertionError(f"no audit line with {needles}")


def test_a_once_marker_is_given_back_when_the_client_left(gp: Proxy, mock_upstream: Mock) -> None:
    conv = f"grant-left-{uuid.uuid4().hex[:8]}"
    mock_upstream.script({"tool_calls": [{"name": "apply_credit", "arguments": SMALL}], "delay_ms": 1200})
    _leave_early(gp, conv, SUPPORT_KEY, _body([CREDIT]))
    _wait_audit(gp, '"given_back:once"', conv)
    mock_upstream.script({"tool_calls": [{"name": "apply_credit", "arguments": SMALL}]})
    assert _names(_turn(gp, conv)) == ["apply_credit"]  # the credit was never delivered: it may be made now
    mock_upstream.script({"tool_calls": [{"name": "apply_credit", "arguments": SMALL}]})
    assert _names(_turn(gp, conv)) == []  # delivered once: now it is a repeat


def test_a_delivered_once_marker_stays_used(gp: Proxy, mock_upstream: Mock) -> None:
    conv = f"grant-kept-{uuid.uuid4().hex[:8]}"
    for expected in (["apply_credit"], []):
        mock_upstream.script({"tool_calls": [{"name": "apply_credit", "arguments": SMALL}]})
        assert _names(_turn(gp, conv)) == expected


def test_a_stored_answer_keeps_its_grant_for_the_retry(gp: Proxy, mock_upstream: Mock) -> None:
    """With an Idempotency-Key the answer is stored: the retry gets the call, so its marker stays used."""
    conv, key = f"grant-idem-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    mock_upstream.script({"tool_calls": [{"name": "apply_credit", "arguments": SMALL}], "delay_ms": 1200})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gp.url + "/chat/completions", json=_body([CREDIT]), timeout=httpx.Timeout(30, read=0.3),
                   headers={"authorization": f"Bearer {SUPPORT_KEY}", CONV: conv, "idempotency-key": key})
    deadline = time.monotonic() + 15
    while True:  # 409 idempotency_in_flight until the first request's answer is stored
        replay = gp.post("/v1/chat/completions", key=SUPPORT_KEY, headers={CONV: conv, "idempotency-key": key},
                         json=_body([CREDIT]))
        if replay.status_code != 409 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert replay.headers.get("idempotent-replayed") == "true" and _names(replay) == ["apply_credit"]
    mock_upstream.script({"tool_calls": [{"name": "apply_credit", "arguments": SMALL}]})
    assert _names(_turn(gp, conv)) == []  # delivered once (by the replay): now it is a repeat


def test_a_marker_is_given_back_when_a_later_choice_is_refused(gp: Proxy, mock_upstream: Mock) -> None:
    conv = f"grant-choice-{uuid.uuid4().hex[:8]}"
    bad = {"index": 1, "finish_reason": "stop", "message": {"role": "assistant", "content": "not a TicketAction"}}
    mock_upstream.script({"tool_calls": [{"name": "apply_credit", "arguments": SMALL}], "extra_choices": [bad]})
    r = _turn(gp, conv, n=2)
    assert r.status_code == 422 and r.json()["error"]["code"] == "schema_validation_failed"
    mock_upstream.script({"tool_calls": [{"name": "apply_credit", "arguments": SMALL}]})
    assert _names(_turn(gp, conv)) == ["apply_credit"]


def test_an_approval_is_given_back_when_the_client_left(gp: Proxy, mock_upstream: Mock) -> None:
    conv = f"grant-approval-{uuid.uuid4().hex[:8]}"
    mock_upstream.script({"tool_calls": [{"name": "transfer_funds", "arguments": BIG}]})
    held = _turn(gp, conv, key=HOLDER_KEY, tools=[TRANSFER])
    approval = held.headers["x-guardproxy-approval-id"]
    assert gp.post(f"/admin/approvals/{approval}/approve", key=ADMIN_KEY, json={}).status_code == 200
    mock_upstream.script({"tool_calls": [{"name": "transfer_funds", "arguments": BIG}], "delay_ms": 1200})
    _leave_early(gp, conv, HOLDER_KEY, _body([TRANSFER]))
    _wait_audit(gp, '"given_back:approval"', conv)
    state = gp.get("/admin/approvals", key=ADMIN_KEY).json()["data"]
    assert [a["status"] for a in state if a["id"] == approval] == ["approved"]
    mock_upstream.script({"tool_calls": [{"name": "transfer_funds", "arguments": BIG}]})
    assert _names(_turn(gp, conv, key=HOLDER_KEY, tools=[TRANSFER])) == ["transfer_funds"]
    mock_upstream.script({"tool_calls": [{"name": "transfer_funds", "arguments": BIG}]})
    assert _names(_turn(gp, conv, key=HOLDER_KEY, tools=[TRANSFER])) == []  # used once, by the delivered one


def test_a_marker_is_given_back_when_a_stream_is_cut_before_the_call(gp: Proxy, mock_upstream: Mock) -> None:
    """The support policy checks the text, so a stream's calls come after it (and after the reasoning it
    held): a client that stops reading during a long answer is cut before it gets the call."""
    conv = f"grant-stream-{uuid.uuid4().hex[:8]}"
    ticket = orjson.dumps({"action": "apply_credit", "reason": "small", "confidence": 0.9,
                           "requires_human_review": False}).decode()
    mock_upstream.script({"content": ticket, "raw_deltas": [{"reasoning_content": "r" * 65536}] * 250,
                          "tool_calls": [{"name": "apply_credit", "arguments": SMALL}]})
    payload = orjson.dumps(_body([CREDIT], stream=True))
    port = int(gp.root.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port))
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  + f"authorization: Bearer {SUPPORT_KEY}\r\n{CONV}: {conv}\r\n".encode()
                  + f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
        # it reads nothing: cut after 1 s without progress, its call never sent and the marker given back
        _wait_audit(gp, '"client_timeout"', '"given_back:once"', conv, timeout=60)
    finally:
        s.close()
    mock_upstream.script({"tool_calls": [{"name": "apply_credit", "arguments": SMALL}]})
    assert _names(_turn(gp, conv)) == ["apply_credit"]
