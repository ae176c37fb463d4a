"""Micro-benchmark: policy evaluation per request, in µs (``evaluate_request`` + ``evaluate_response``).

Run: ``python bench/bench_policy.py``. Compiles the shipped policies (``policies/support-agent.yaml`` +
``org-base.yaml``), takes the support-agent's effective policy and times, best of several repeats, one
request-side and one response-side evaluation for the answers the live benchmark and the demo produce:
an allowed ``get_ticket_history`` call (declared schema), an ``apply_credit`` over $50 (pinned schema +
CEL rule -> escalate), a structured TicketAction answer (output schema + rewrite rule), and the request
side alone. Target: < 50 µs per request for the pair. No assertions on timing: printed figures only.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from proxy.policy_source import build  # noqa: E402
from rules.decision import ToolCallIn  # noqa: E402
from rules.evaluate import Principal, evaluate_request  # noqa: E402
from rules.evaluate_response import ResponseContext, evaluate_response  # noqa: E402
from rules.schemas import SchemaCache  # noqa: E402

TICKET_SCHEMA: dict[str, Any] = {"type": "object", "properties": {"ticket_id": {"type": "string"}},
                                 "required": ["ticket_id"], "additionalProperties": False}
TICKET_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_ticket_history", "description": "Ticket history", "parameters": TICKET_SCHEMA}}
CREDIT_TOOL = {"type": "function", "function": {"name": "apply_credit", "parameters": {"type": "object"}}}
BODY: dict[str, Any] = {
    "model": "gpt-4o-mini", "max_tokens": 256, "temperature": 0.7,
    "messages": [{"role": "system", "content": "You are a support agent."},
                 {"role": "user", "content": "Customer C-7 asks about ticket T-1042."}],
    "tools": [TICKET_TOOL, CREDIT_TOOL,
              {"type": "function", "function": {"name": "delete_account", "parameters": {"type": "object"}}}],
}
CASES: dict[str, tuple[list[ToolCallIn], str | None]] = {
    "get_ticket_history (allowed, declared schema)":
        ([ToolCallIn(0, "call_1", "get_ticket_history", '{"ticket_id": "T-1042"}')], None),
    "apply_credit $75 (pinned schema + CEL -> escalate)":
        ([ToolCallIn(0, "call_1", "apply_credit", '{"customer_id": "C-7", "amount": 75}')], None),
    "TicketAction content (output schema + rewrite rule)":
        ([], '{"action": "resolve", "reason": "refunded", "confidence": 0.6, "requires_human_review": false}'),
}


def per_call_us(func: Callable[[], object], number: int, repeat: int = 5) -> float:
    return min(timeit.repeat(func, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=5000, help="calls per repeat")
    args = parser.parse_args()
    compiled, errors, _ = build([ROOT / "policies"])
    if compiled is None:
        raise SystemExit("policies failed to compile:\n" + "\n".join(map(str, errors)))
    principal = Principal("support-agent", "support")
    eff = compiled.for_principal(principal.key_id, principal.team, principal.org)
    declared = {"get_ticket_history": SchemaCache().get(TICKET_SCHEMA)}
    rctx = ResponseContext(principal, "gpt-4o-mini", declared)
    request = evaluate_request(eff, BODY, principal, now=0.0)
    print(f"support-agent + org-base, revision {compiled.revision}; request decision: {request.effect} "
          f"{list(request.actions)}")
    req_us = per_call_us(lambda: evaluate_request(eff, BODY, principal, now=0.0), args.number)
    print(f"  {'evaluate_request (strip delete_account, clamp temperature)':<58} {req_us:8.2f} µs")
    for label, (calls, content) in CASES.items():
        decision = evaluate_response(eff, calls, content, rctx, now=0.0)
        def respond(c: list[ToolCallIn] = calls, t: str | None = content) -> object:
            return evaluate_response(eff, c, t, rctx, now=0.0)

        resp_us = per_call_us(respond, args.number)
        verdicts: list[str] = [v.verdict for v in decision.calls] or [
            decision.output.verdict if decision.output else "-"]
        print(f"  {'evaluate_response: ' + label:<58} {resp_us:8.2f} µs  ({'/'.join(verdicts)})")
        print(f"  {'  request + response per request':<58} {req_us + resp_us:8.2f} µs  (target < 50 µs)")


if __name__ == "__main__":
    main()
