"""What the org guarantees holds through every layer (live server).

- An escalation call is a new call: a team's ``escalate_to`` naming a tool the org holds for approval gets
  the call held, never delivered as is.
- A team's output rewrite cannot override a field the org's rewrite sets, and the rewritten output is
  checked again against every layer's schema and deny patterns.
- Response rules see the model that served the request (after a ladder downgrade), not the one asked for.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from conftest import ADMIN_KEY, Mock, Proxy, default_config, free_port

ORG = """apiVersion: guardproxy/v1
kind: Policy
metadata: {name: org}
match: {all: true}
tools:
  allow:
    close_account:
      rules:
        - {id: org-hold-close, when: "true", action: require_approval, reason: closing an account needs a human}
output:
  schema:
    type: object
    properties:
      action: {enum: [resolve, escalate]}
      requires_human_review: {type: boolean}
  deny_patterns:
    - {id: no-cards, regex: '\\b(?:\\d[ -]?){13,16}\\b', reason: no card numbers}
  rules:
    - id: org-review
      when: "has(output.confidence) && output.confidence < 0.75"
      action: rewrite
      set: {requires_human_review: true}
"""
TEAM = """apiVersion: guardproxy/v1
kind: Policy
metadata: {name: team}
match: {teams: [ops]}
tools:
  escalate_to: close_account
  allow:
    close_account: {}
    refund:
      rules:
        - {id: always-escalate, when: "true", action: escalate, reason: refunds go up}
output:
  rules:
    - {id: team-no-review, when: "true", action: rewrite, set: {requires_human_review: false}}
"""
BAD_REWRITE = """apiVersion: guardproxy/v1
kind: Policy
metadata: {name: rewriter}
match: {keys: [rewriter]}
output:
  rules:
    - {id: rewrite-enum, when: "output.action == 'resolve'", action: rewrite, set: {action: refund_everything}}
    - {id: rewrite-card, when: "output.action == 'escalate'", action: rewrite, set: {note: '4111 1111 1111 1111'}}
"""
SERVED = """apiVersion: guardproxy/v1
kind: Policy
metadata: {name: served}
match: {keys: [served]}
cost:
  per_conversation_usd: 0.01
  ladder:
    - {at: 0.5, downgrade: {gpt-4o: gpt-4o-mini}}
tools:
  allow:
    bulk_export:
      rules:
        - {id: no-bulk-on-mini, when: "model == 'gpt-4o-mini'", action: deny, reason: the small model may not export}
"""
KEYS = {"ops": "sk-org-ops", "rewriter": "sk-org-rewriter", "served": "sk-org-served"}


@pytest.fixture(scope="module")
def gp(make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> Proxy:
    cfg = default_config(mock_upstream.url, free_port())
    cfg["keys"] = [{"id": "ops", "key": KEYS["ops"], "team": "ops"},
                   {"id": "rewriter", "key": KEYS["rewriter"]}, {"id": "served", "key": KEYS["served"]}]
    return make_proxy(policies={"org.yaml": ORG, "team.yaml": TEAM, "rewriter.yaml": BAD_REWRITE,
                                "served.yaml": SERVED}, config=cfg)


@pytest.fixture(autouse=True)
def _fresh(mock_upstream: Mock) -> None:
    mock_upstream.reset()


def _ask(gp: Proxy, who: str, conv: str | None = None, **body: Any) -> httpx.Response:
    doc = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "help"}], **body}
    headers = {"x-guardproxy-conversation-id": conv} if conv else {}
    return gp.post("/v1/chat/completions", key=KEYS[who], headers=headers, json=doc)


def _tools(*names: str) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in names]


@pytest.mark.parametrize("stream", [False, True])
def test_a_team_escalation_to_an_org_held_tool_is_held(gp: Proxy, mock_upstream: Mock, stream: bool) -> None:
    mock_upstream.script({"tool_calls": [{"name": "refund", "arguments": '{"order": 7}'}]})
    r = _ask(gp, "ops", tools=_tools("refund", "close_account"), stream=stream)
    assert r.status_code == 200
    assert b"close_account" not in r.content.replace(b"escalated to close_account", b"")
    pending = gp.get("/admin/approvals?status=pending", key=ADMIN_KEY).json()["data"]
    assert pending[0]["tool"] == "close_account" and pending[0]["rule_id"] == "org-hold-close"


def test_once_approved_the_escalation_call_is_delivered(gp: Proxy, mock_upstream: Mock) -> None:
    conv = f"esc-{uuid.uuid4().hex[:8]}"
    mock_upstream.script({"tool_calls": [{"name": "refund", "arguments": '{"order": 8}'}]})
    held = _ask(gp, "ops", conv, tools=_tools("refund", "close_account"))
    approval = held.headers["x-guardproxy-approval-id"]
    assert gp.post(f"/admin/approvals/{approval}/approve", key=ADMIN_KEY, json={}).status_code == 200
    mock_upstream.script({"tool_calls": [{"name": "refund", "arguments": '{"order": 8}'}]})
    r = _ask(gp, "ops", conv, tools=_tools("refund", "close_account"))
    calls = r.json()["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["close_account"]
    assert orjson.loads(calls[0]["function"]["arguments"])["original_tool"] == "refund"


@pytest.mark.parametrize(("confidence", "review"), [(0.5, True), (0.9, False)])
def test_a_team_rewrite_cannot_reset_the_orgs_field(gp: Proxy, mock_upstream: Mock, confidence: float,
                                                   review: bool) -> None:
    mock_upstream.script({"content": orjson.dumps({"action": "resolve", "confidence": confidence}).decode()})
    r = _ask(gp, "ops")
    assert r.status_code == 200
    assert orjson.loads(r.json()["choices"][0]["message"]["content"])["requires_human_review"] is review


@pytest.mark.parametrize(("action", "status", "code"), [
    ("resolve", 422, "schema_validation_failed"),  # rewritten into an action the org's schema refuses
    ("escalate", 403, "policy_denied"),  # rewritten to carry a card number the org forbids
])
def test_a_rewritten_output_is_checked_again(gp: Proxy, mock_upstream: Mock, action: str, status: int,
                                             code: str) -> None:
    mock_upstream.script({"content": orjson.dumps({"action": action}).decode()})
    r = _ask(gp, "rewriter")
    assert r.status_code == status and r.json()["error"]["code"] == code
    assert "refund_everything" not in r.text and "4111" not in r.text


def test_response_rules_see_the_model_that_served(gp: Proxy, mock_upstream: Mock) -> None:
    conv = f"served-{uuid.uuid4().hex[:8]}"
    # 600 x $10/M = $0.006 on gpt-4o: 60% of the $0.01 conversation, past the 0.5 downgrade step
    mock_upstream.script({"content": '{"action": "resolve"}', "usage": {"prompt_tokens": 5, "completion_tokens": 600}})
    first = _ask(gp, "served", conv, model="gpt-4o", max_tokens=600)
    assert first.headers["x-guardproxy-model"] == "gpt-4o"
    mock_upstream.script({"tool_calls": [{"name": "bulk_export", "arguments": "{}"}]})
    r = _ask(gp, "served", conv, model="gpt-4o", max_tokens=10, tools=_tools("bulk_export"))
    assert r.headers["x-guardproxy-model"] == "gpt-4o-mini"
    assert "tool_denied:bulk_export" in r.headers["x-guardproxy-actions"]
    assert "no-bulk-on-mini" in r.json()["choices"][0]["message"]["content"]
