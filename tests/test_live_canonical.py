"""Re-spelling arguments never makes a repeated action new (live server, memory and Redis stores).

Two calls are the same action when their arguments are equal as JSON values (``20``, ``20.0``, ``2e1``,
``20.00`` are one number; key order and whitespace never matter): once-per-conversation markers and
approval bindings both use that one canonical form.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import yaml
from conftest import ADMIN_KEY, SUPPORT_KEY, Mock, Proxy, default_config, free_port, shipped_policies, store_for

RUN = uuid.uuid4().hex[:8]
APPROVER = f"canon-approver-{RUN}"
APPROVER_KEY = "sk-canon-approver"
CREDIT = {"type": "function", "function": {"name": "apply_credit", "parameters": {"type": "object"}}}
TRANSFER = {"type": "function", "function": {"name": "transfer_funds", "parameters": {"type": "object"}}}
HOLD = yaml.safe_dump({
    "apiVersion": "guardproxy/v1", "kind": "Policy", "metadata": {"name": "canon-hold"},
    "match": {"keys": [APPROVER]},
    "tools": {"allow": {"transfer_funds": {"rules": [{"id": "big-transfer", "when": "double(args.amount) > 100.0",
                                                       "action": "require_approval"}]}}}})


@pytest.fixture(scope="module", params=["memory", "redis"])
def gp(request: pytest.FixtureRequest, make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> Proxy:
    store = store_for(request.param)
    cfg = default_config(mock_upstream.url, free_port(), store)
    cfg["keys"].append({"id": APPROVER, "key": APPROVER_KEY})
    return make_proxy(policies={**shipped_policies(), "hold.yaml": HOLD}, config=cfg)


@pytest.fixture(autouse=True)
def _fresh(mock_upstream: Mock) -> None:
    mock_upstream.reset()


def _turn(p: Proxy, conv: str, name: str, args: str, key: str = SUPPORT_KEY,
          tools: list[dict[str, Any]] | None = None) -> httpx.Response:
    return p.post("/v1/chat/completions", key=key, headers={"x-guardproxy-conversation-id": conv},
                  json={"model": "gpt-4o-mini", "tools": tools or [CREDIT],
                        "messages": [{"role": "user", "content": "credit the customer"}]})


def _calls(r: httpx.Response) -> list[tuple[str, str]]:
    msg = r.json()["choices"][0]["message"]
    return [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls") or ()]


SPELLINGS = ['{"customer_id": "c-1", "amount": 20.0}', '{"customer_id": "c-1", "amount": 2e1}',
             '{"customer_id": "c-1", "amount": 20.00}', '{ "amount" : 20 , "customer_id" : "c-1" }',
             '{"amount":2.0E+1,"customer_id":"c-1"}']


@pytest.mark.parametrize("again", SPELLINGS)
def test_once_per_conversation_holds_across_number_spellings(gp: Proxy, mock_upstream: Mock, again: str) -> None:
    conv = f"canon-once-{uuid.uuid4().hex[:8]}"
    first_args = '{"customer_id": "c-1", "amount": 20}'
    mock_upstream.script({"tool_calls": [{"name": "apply_credit", "arguments": first_args}]},
                         {"tool_calls": [{"name": "apply_credit", "arguments": again}]})
    first = _turn(gp, conv, "apply_credit", first_args)
    assert _calls(first) == [("apply_credit", first_args)]
    second = _turn(gp, conv, "apply_credit", again)
    assert second.status_code == 200
    assert _calls(second) == []
    assert "tool_denied:apply_credit" in second.headers["x-guardproxy-actions"]
    assert "once_per_conversation" in second.json()["choices"][0]["message"]["content"]


def test_a_different_amount_is_a_different_action(gp: Proxy, mock_upstream: Mock) -> None:
    conv = f"canon-diff-{uuid.uuid4().hex[:8]}"
    for args in ('{"customer_id": "c-1", "amount": 20}', '{"customer_id": "c-1", "amount": 20.5}',
                 '{"customer_id": "c-2", "amount": 20}'):
        mock_upstream.script({"tool_calls": [{"name": "apply_credit", "arguments": args}]})
    assert len(_calls(_turn(gp, conv, "apply_credit", ""))) == 1
    assert len(_calls(_turn(gp, conv, "apply_credit", ""))) == 1
    assert len(_calls(_turn(gp, conv, "apply_credit", ""))) == 1  # another customer


def test_an_approval_binds_the_value_not_the_spelling(gp: Proxy, mock_upstream: Mock) -> None:
    conv = f"canon-approval-{uuid.uuid4().hex[:8]}"
    held_args = '{"to": "acct-9", "amount": 150}'
    mock_upstream.script({"tool_calls": [{"name": "transfer_funds", "arguments": held_args}]})
    held = _turn(gp, conv, "transfer_funds", held_args, key=APPROVER_KEY, tools=[TRANSFER])
    assert _calls(held) == []
    approval_id = held.headers["x-guardproxy-approval-id"]
    assert gp.post(f"/admin/approvals/{approval_id}/approve", key=ADMIN_KEY, json={}).status_code == 200
    respelled = '{"amount": 1.5e2, "to": "acct-9"}'
    mock_upstream.script({"tool_calls": [{"name": "transfer_funds", "arguments": respelled}]},
                         {"tool_calls": [{"name": "transfer_funds", "arguments": '{"amount": 150.0, "to": "acct-9"}'}]})
    granted = _turn(gp, conv, "transfer_funds", respelled, key=APPROVER_KEY, tools=[TRANSFER])
    assert _calls(granted) == [("transfer_funds", respelled)]
    assert "approved:transfer_funds" in granted.headers["x-guardproxy-actions"]
    again = _turn(gp, conv, "transfer_funds", "", key=APPROVER_KEY, tools=[TRANSFER])
    assert _calls(again) == []  # the approval was used once
