"""Shadow mode reports every decision it would have made; every prompt field is priced (live server).

A shadow policy's cost limits, ``once_per_conversation`` and escalations produce ``would_*`` findings in
``x-guardproxy-actions`` and the audit line's ``would`` list, and never act. Everything the model reads
is in the estimate: a long description under legacy ``functions`` or inside a ``response_format`` schema
costs what it costs under ``tools``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import yaml
from conftest import Mock, Proxy, default_config, free_port

SHADOW = yaml.safe_dump({
    "apiVersion": "guardproxy/v1", "kind": "Policy", "metadata": {"name": "watch"}, "match": {"keys": ["shadowed"]},
    "mode": "shadow",
    "tools": {"escalate_to": "escalate_to_human", "allow": {
        "escalate_to_human": {},
        "apply_credit": {"once_per_conversation": True, "on_invalid": "escalate",
                         "schema": {"type": "object", "required": ["amount"],
                                    "properties": {"amount": {"type": "number"}}}}}},
    "cost": {"per_request_usd": 0.0001, "per_conversation_usd": 0.001}})
PRICED = yaml.safe_dump({"apiVersion": "guardproxy/v1", "kind": "Policy", "metadata": {"name": "priced"},
                         "match": {"keys": ["priced"]}, "cost": {"per_request_usd": 0.05}})
KEYS = {"shadowed": "sk-shadowed", "priced": "sk-priced"}
CONV = "x-guardproxy-conversation-id"


@pytest.fixture(scope="module")
def gp(make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> Proxy:
    cfg = default_config(mock_upstream.url, free_port())
    cfg["keys"] = [{"id": k, "key": v} for k, v in KEYS.items()]
    return make_proxy(policies={"shadow.yaml": SHADOW, "priced.yaml": PRICED}, config=cfg)


@pytest.fixture(autouse=True)
def _fresh(mock_upstream: Mock) -> None:
    mock_upstream.reset()


def _ask(gp: Proxy, who: str, conv: str, **body: Any) -> httpx.Response:
    doc = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "help"}], **body}
    return gp.post("/v1/chat/completions", key=KEYS[who], headers={CONV: conv}, json=doc)


CREDIT = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
          for n in ("apply_credit", "escalate_to_human")]


def test_a_shadow_cost_block_reports_would_refuse(gp: Proxy, mock_upstream: Mock) -> None:
    conv = f"sh-cost-{uuid.uuid4().hex[:8]}"
    mock_upstream.script({"content": "fine"})
    r = _ask(gp, "shadowed", conv, max_tokens=500)  # 500 x $0.60/M = $0.0003 > the shadow $0.0001 a request
    assert r.status_code == 200  # shadow: served
    assert "would_refuse:budget_exceeded" in r.headers["x-guardproxy-actions"]
    assert "would_refuse:budget_exceeded" in gp.audit_for(r.headers["x-guardproxy-decision-id"])["would"]


def test_a_shadow_conversation_budget_sees_the_real_spend(gp: Proxy, mock_upstream: Mock) -> None:
    conv = f"sh-conv-{uuid.uuid4().hex[:8]}"
    seen = []
    for _ in range(12):  # 160 x $0.60/M = $0.000096 a turn (under the shadow $0.0001 a request) fills $0.001
        mock_upstream.script({"content": "fine", "usage": {"prompt_tokens": 5, "completion_tokens": 160}})
        r = _ask(gp, "shadowed", conv, max_tokens=160)
        assert r.status_code == 200
        seen.append("would_refuse:budget_exceeded" in r.headers.get("x-guardproxy-actions", ""))
    assert seen[0] is False and seen[-1] is True


def test_a_shadow_once_rule_reports_the_repeat_and_delivers_it(gp: Proxy, mock_upstream: Mock) -> None:
    conv = f"sh-once-{uuid.uuid4().hex[:8]}"
    results = []
    for _ in range(2):
        mock_upstream.script({"tool_calls": [{"name": "apply_credit", "arguments": '{"amount": 5}'}]})
        r = _ask(gp, "shadowed", conv, tools=CREDIT)
        names = [c["function"]["name"] for c in r.json()["choices"][0]["message"].get("tool_calls") or ()]
        results.append((names, gp.audit_for(r.headers["x-guardproxy-decision-id"])["would"]))
    assert results[0][0] == results[1][0] == ["apply_credit"]  # delivered both times
    assert "would_block_once:apply_credit" not in results[0][1]
    assert "would_block_once:apply_credit" in results[1][1]


def test_a_shadow_on_invalid_escalate_reports_would_escalate(gp: Proxy, mock_upstream: Mock) -> None:
    conv = f"sh-esc-{uuid.uuid4().hex[:8]}"
    mock_upstream.script({"tool_calls": [{"name": "apply_credit", "arguments": '{"amount": "lots"}'}]})
    r = _ask(gp, "shadowed", conv, tools=CREDIT)
    names = [c["function"]["name"] for c in r.json()["choices"][0]["message"]["tool_calls"]]
    assert names == ["apply_credit"]  # shadow: the call is not rewritten
    would = gp.audit_for(r.headers["x-guardproxy-decision-id"])["would"]
    assert "would_schema_invalid:apply_credit" in would and "would_escalate:apply_credit" in would


DESCRIPTION = "lorem ipsum dolor sit amet " * 8000  # ~40,000 tokens: $0.006 on gpt-4o-mini, $0.10 on gpt-4o


@pytest.mark.parametrize("field", ["tools", "functions", "response_format"])
def test_every_field_the_model_reads_is_priced(gp: Proxy, mock_upstream: Mock, field: str) -> None:
    fn = {"name": "lookup", "description": DESCRIPTION, "parameters": {"type": "object"}}
    extra: dict[str, Any] = {
        "tools": {"tools": [{"type": "function", "function": fn}]},
        "functions": {"functions": [fn]},
        "response_format": {"response_format": {"type": "json_schema", "json_schema": {
            "name": "answer", "description": DESCRIPTION, "schema": {"type": "object"}}}},
    }[field]
    r = _ask(gp, "priced", f"price-{uuid.uuid4().hex[:8]}", model="gpt-4o", max_tokens=10, **extra)
    assert r.status_code == 429, r.text[:200]
    err = r.json()["error"]
    assert err["code"] == "budget_exceeded" and err["budget"]["scope"] == "request"
    assert mock_upstream.calls() == []
