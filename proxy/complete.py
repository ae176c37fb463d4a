"""The non-streamed half of ``POST /v1/chat/completions``: upstream, response decision, repair, apply.

The upstream answer is read through :mod:`proxy.upstream_shape` (by ``AppState.call_upstream``), decided
by the pure core, repaired up to the policy's budget, and applied: calls kept, removed, escalated or held,
text rewritten or refused. Grants a kept call consumes (an approval, a once-per-conversation marker) are
given back when the response never leaves: the request fails later, or the client is gone by the time the
answer is ready (:class:`DeliveredResponse`).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from proxy.reqctx import RequestContext
from proxy.respond import (
    dumps,
    extract_calls,
    give_back,
    message_of,
    message_text,
    refuse_or_escalate,
    repair_body,
    repair_budget,
    rewrite_message,
    still_invalid,
)
from rules.evaluate import printable_name
from rules.evaluate_response import ResponseContext, evaluate_response

if TYPE_CHECKING:
    from proxy.state import AppState
    from rules.decision import ResponseDecision
    from rules.effective import Effective


class DeliveredResponse(Response):
    """A JSON answer that gives its consumed grants back if the client left before it could be sent.

    The check is one look at ``receive``: the body was read to its end, so the next message is
    ``http.disconnect`` only if the client is gone. Done only when grants are at stake.
    """

    def __init__(self, content: bytes, headers: dict[str, str], state: AppState, ctx: RequestContext) -> None:
        super().__init__(content, media_type="application/json", headers=headers)
        self._state, self._ctx = state, ctx

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        ctx = self._ctx
        try:
            if ctx.effects and await _client_gone(receive):
                ctx.actions.append("client_disconnected")
                await give_back(self._state.store, ctx)
                return
            await super().__call__(scope, receive, send)
        finally:
            self._state.telemetry.finish(ctx)  # the audit line says whether the grants went back


async def _client_gone(receive: Any) -> bool:
    peek = asyncio.ensure_future(receive())
    await asyncio.sleep(0)  # one loop turn: a disconnected client's receive() returns at once
    if not peek.done():
        peek.cancel()
        return False
    return bool(peek.result().get("type") == "http.disconnect")


async def complete(state: AppState, ctx: RequestContext, eff: Effective, rctx: ResponseContext,
                   body: dict[str, Any], forward_raw: bytes | None, *, replayable: bool) -> Response:
    """Call the upstream (and repair), decide and apply; settle; the response for the client.

    ``replayable``: the answer is stored for an ``Idempotency-Key``, so a retry gets it (and the calls it
    carries) even if this client never reads it; its grants are then never given back.
    """
    plan = ctx.plan
    assert plan is not None
    target = state.targets[plan.model]
    attempt_body, prompt_tokens = body, plan.prompt_tokens
    repairs_left: int | None = None
    while True:
        data = await state.call_upstream(ctx, target, attempt_body, forward_raw, prompt_tokens=prompt_tokens)
        choices = data["choices"]
        message = message_of(choices[0])
        text, other_text = message_text(message, eff)
        decision = evaluate_response(eff, extract_calls(message), text, rctx, now=time.time(), other_text=other_text)
        budget = repair_budget(decision)
        if repairs_left is None:
            repairs_left = budget
        if budget > 0 and repairs_left > 0 and len(choices) == 1:
            repairs_left -= 1
            _repair_requested(state, ctx, decision)
            attempt_body, forward_raw = repair_body(body, message, decision), None
            prompt_tokens = await state.cost.count_prompt(plan.model, attempt_body)
            continue
        if ctx.repairs:
            _repair_done(state, ctx, decision)
        break
    ctx.absorb(decision)
    state.telemetry.response_decision(ctx, decision)
    await _apply(state, ctx, eff, decision, choices[0], message)
    for extra in choices[1:]:
        msg = message_of(extra)
        t, other = message_text(msg, eff)
        d = evaluate_response(eff, extract_calls(msg), t, rctx, now=time.time(), other_text=other)
        ctx.absorb(d)
        await _apply(state, ctx, eff, d, extra, msg)
    if ctx.usage:
        data["usage"] = ctx.usage if ctx.repairs or "usage_capped" in ctx.actions else data.get("usage", ctx.usage)
    await state.cost.settle(plan, ctx.usage or None, now=time.time())
    ctx.finish_reasons = [str(c.get("finish_reason")) for c in choices]
    content = dumps(data)
    state.telemetry.record_output(ctx, [c.get("message") for c in choices])
    if replayable or not ctx.effects:
        # Delivered by this response or by its replay (Idempotency-Key), exactly once either way.
        ctx.effects.clear()
        state.telemetry.finish(ctx)
        return Response(content, media_type="application/json", headers=ctx.headers())
    return DeliveredResponse(content, ctx.headers(), state, ctx)


def _repair_requested(state: AppState, ctx: RequestContext, decision: ResponseDecision) -> None:
    ctx.repairs += 1
    ctx.errors.extend(decision.errors)
    for v in decision.calls:
        if v.verdict == "invalid":
            ctx.actions.append(f"repair_requested:{printable_name(v.call.name)}")
    if decision.output is not None and decision.output.verdict == "invalid":
        ctx.actions.append("repair_requested:output")
    state.telemetry.metrics.repair("attempted")


def _repair_done(state: AppState, ctx: RequestContext, decision: ResponseDecision) -> None:
    outcome = "succeeded" if decision.effect != "deny" and not still_invalid(decision) else "exhausted"
    state.telemetry.metrics.repair(outcome)
    if outcome == "succeeded":
        for v in decision.calls:
            ctx.actions.append(f"repaired:{printable_name(v.call.name)}")
        if not decision.calls:
            ctx.actions.append("repaired:output")


async def _apply(state: AppState, ctx: RequestContext, eff: Effective, decision: ResponseDecision,
                 choice: dict[str, Any], message: dict[str, Any]) -> None:
    out = decision.output
    escalation = refuse_or_escalate(out)
    if escalation is not None:
        message["content"] = None
        message["tool_calls"] = [escalation]
        choice["finish_reason"] = "tool_calls"
        ctx.actions.append("escalated:output")
    elif out is not None and out.verdict == "rewrite":
        message["content"] = out.content
    if decision.calls:
        outcome = await state.resolve_calls(ctx, eff, decision.calls)
        new_finish = rewrite_message(message, outcome)
        if new_finish is not None:
            choice["finish_reason"] = new_finish

