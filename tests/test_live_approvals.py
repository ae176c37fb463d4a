"""Live-server tests: approving or rejecting an approval is one atomic transition.

Each test holds a call through the real ``guardproxy serve`` (a policy with ``action: require_approval``
on ``refund``; the mock model is scripted to call it), then decides it through ``/admin/approvals``:
exactly one decide wins (200, counted once in ``guardproxy_approvals_total``, one audit line), every other
one, sequential or concurrent, gets ``409 approval_not_pending``. Runs on both store backends: ``memory``
and a real Redis (db 13; ids unique per run, the db is never flushed).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
import yaml
from conftest import ADMIN_KEY, Mock, Proxy, default_config, free_port

REDIS13 = "redis://127.0.0.1:6379/13"
RUN = uuid.uuid4().hex[:8]
AGENT_ID = f"approvals-agent-{RUN}"
AGENT_KEY = "sk-approvals-agent"
CONV = "x-guardproxy-conversation-id"
REFUND = {"type": "function", "function": {"name": "refund", "parameters": {
    "type": "object", "properties": {"amount": {"type": "number"}}, "required": ["amount"]}}}
POLICIES = {"agent.yaml": yaml.safe_dump({
    "apiVersion": "guardproxy/v1", "kind": "Policy", "metadata": {"name": "approvals-agent"},
    "match": {"keys": [AGENT_ID]},
    "tools": {"default": "allow", "allow": {"refund": {"rules": [
        {"id": "refund-needs-human", "when": "double(args.amount) > 0.0", "action": "require_approval",
         "reason": "refunds need a human"}]}}}})}


@pytest.fixture(scope="module", params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> Proxy:
    store = "memory"
    if request.param == "redis":
        r = redis.Redis.from_url(REDIS13)
        assert r.ping()  # a missing Redis is a failure, not a skip
        r.close()
        store = REDIS13
    cfg = default_config(mock_upstream.url, free_port(), store)
    cfg["keys"] = [{"id": AGENT_ID, "key": AGENT_KEY}]
    return make_proxy(policies=POLICIES, config=cfg)


@pytest.fixture(autouse=True)
def _fresh_mock(mock_upstream: Mock) -> None:
    mock_upstream.reset()


def _held(p: Proxy, mock: Mock, conversation: str | None = None) -> str:
    """A refund call (in a fresh conversation unless named) that is held; returns its approval's id."""
    mock.script({"tool_calls": [{"name": "refund", "arguments": '{"amount": 250}'}]})
    raw = p.client(AGENT_KEY).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "refund me"}], tools=[REFUND],
        extra_headers={CONV: conversation or f"conv-{uuid.uuid4().hex}"})
    assert not raw.parse().choices[0].message.tool_calls  # held, not delivered
    aid: str = raw.headers["x-guardproxy-approval-id"]
    assert aid.startswith("apr_")
    return aid


def _decide(p: Proxy, aid: str, verb: str) -> httpx.Response:
    return p.post(f"/admin/approvals/{aid}/{verb}", key=ADMIN_KEY, json={"note": "checked"})


async def _decide_concurrently(p: Proxy, aid: str, verb: str, n: int) -> list[httpx.Response]:
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=p.root, headers=headers, timeout=30) as client:
        return list(await asyncio.gather(*(client.post(f"/admin/approvals/{aid}/{verb}") for _ in range(n))))


def _approvals_total(p: Proxy, outcome: str) -> float:
    text = p.get("/metrics", key=None).text
    m = re.search(rf'^guardproxy_approvals_total\{{outcome="{outcome}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def _audit_lines(p: Proxy, aid: str) -> list[dict[str, Any]]:
    path = p.dir / "audit.log"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in rows if r.get("event") == "approval" and r.get("approval_id") == aid]


def _not_pending(resp: httpx.Response) -> bool:
    return resp.status_code == 409 and resp.json()["error"]["code"] == "approval_not_pending"


def test_approving_twice_is_409_and_counted_once(backend: Proxy, mock_upstream: Mock) -> None:
    aid = _held(backend, mock_upstream)
    before = _approvals_total(backend, "approved")
    first = _decide(backend, aid, "approve")
    assert first.status_code == 200 and first.json()["status"] == "approved"
    second = _decide(backend, aid, "approve")
    assert _not_pending(second), second.text
    assert "approved" in second.json()["error"]["message"]
    assert _not_pending(_decide(backend, aid, "reject"))  # reject-after-approve cannot flip it either
    assert _approvals_total(backend, "approved") - before == 1
    assert [r["outcome"] for r in _audit_lines(backend, aid)] == ["approved"]
    assert _decide(backend, "apr_0123456789abcdef", "approve").status_code == 404  # unknown stays 404


@pytest.mark.parametrize(("verb", "outcome"), [("approve", "approved"), ("reject", "rejected")])
def test_five_concurrent_decisions_have_one_winner(backend: Proxy, mock_upstream: Mock, verb: str,
                                                   outcome: str) -> None:
    aid = _held(backend, mock_upstream)
    before = _approvals_total(backend, outcome)
    answers = asyncio.run(_decide_concurrently(backend, aid, verb, 5))
    assert sorted(r.status_code for r in answers) == [200, 409, 409, 409, 409]
    assert all(_not_pending(r) for r in answers if r.status_code != 200)
    assert _approvals_total(backend, outcome) - before == 1
    assert [r["outcome"] for r in _audit_lines(backend, aid)] == [outcome]
    listed = backend.get("/admin/approvals", key=ADMIN_KEY).json()["data"]
    assert [a["status"] for a in listed if a["id"] == aid] == [outcome]


def test_approve_after_reject_is_409(backend: Proxy, mock_upstream: Mock) -> None:
    conv = f"conv-{uuid.uuid4().hex}"
    aid = _held(backend, mock_upstream, conv)
    approved_before = _approvals_total(backend, "approved")
    assert _decide(backend, aid, "reject").status_code == 200
    late = _decide(backend, aid, "approve")
    assert _not_pending(late) and "rejected" in late.json()["error"]["message"]
    assert _not_pending(_decide(backend, aid, "reject"))
    assert _approvals_total(backend, "approved") == approved_before
    assert [r["outcome"] for r in _audit_lines(backend, aid)] == ["rejected"]
    assert _held(backend, mock_upstream, conv) == aid  # asking again: still held by the rejected approval
