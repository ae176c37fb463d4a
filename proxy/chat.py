"""``POST /v1/chat/completions``: the request path.

auth -> principal -> body (size, strict JSON, types) -> compiled policy for the
principal -> request decision (strip, clamp, refuse) -> cost (price, ladder,
reserve) -> upstream -> response decision (tool calls, schemas, output rules,
repair) -> settle -> headers, metrics, trace, audit.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from proxy.body import read_json_body, validate_chat_body
from proxy.costing import conversation_id
from proxy.declared import check_offered_tools, response_context
from proxy.errors import ProxyError
from proxy.reqctx import RequestContext
from proxy.respond import (
    dumps,
    extract_calls,
    message_of,
    message_text,
    refuse_or_escalate,
    repair_body,
    repair_budget,
    resolve_calls,
    rewrite_message,
    still_invalid,
)
from rules.evaluate import evaluate_request, printable_name
from rules.evaluate_response import ResponseContext, evaluate_response

if TYPE_CHECKING:
    from proxy.state import AppState
    from rules.effective import Effective

CONVERSATION_HEADER = "x-guardproxy-conversation-id"


async def chat_completions(request: Request) -> Response:
    state: AppState = request.app.state.gp
    try:
        principal = state.keys.principal(request.headers.get("authorization"))
    except ProxyError as err:
        return state.error_response(err, None, route="/v1/chat/completions")
    ctx = RequestContext(principal)
    try:
        return await _handle(state, request, ctx)
    except ProxyError as err:
        ctx.status, ctx.error_code = err.status, err.code
        if err.code == "budget_exceeded":
            state.telemetry.metrics.budget_refusal(str((err.extra.get("budget") or {}).get("scope", "")))
        resp = state.error_response(err, ctx)
        state.telemetry.finish(ctx, error=err)
        return resp


async def _handle(state: AppState, request: Request, ctx: RequestContext) -> Response:
    raw, body = await read_json_body(request, state.config.server.max_body_bytes)
    validate_chat_body(body)
    check_offered_tools(body, state.config.server.max_tools)
    ctx.model_asked = ctx.model_used = body["model"]
    ctx.stream = bool(body.get("stream"))
    if state.config.route(body["model"]) is None:
        raise ProxyError("model_not_found", f"The model {body['model']!r} does not exist on this proxy.",
                         param="model")
    policies = state.policies.current
    if policies is None:
        raise ProxyError("internal_error", "no policy set loaded")
    eff = policies.for_principal(ctx.principal.key_id, ctx.principal.team)
    ctx.revision = policies.revision
    ctx.conversation = conversation_id(ctx.principal, body, request.headers.get(CONVERSATION_HEADER))
    state.telemetry.begin(ctx, request.headers)
    state.telemetry.record_input(ctx, body.get("messages"))
    now = time.time()
    idem = await state.idempotency.begin(request, raw, ctx, fail_open=eff.fail_open)
    if idem.replay is not None:
        ctx.status = idem.replay.status_code
        ctx.actions.append("idempotent_replay")
        state.telemetry.finish(ctx)
        return idem.replay
    try:
        decision = evaluate_request(eff, body, ctx.principal, now=now)
        ctx.absorb(decision)
        state.telemetry.request_decision(ctx, decision)
        if decision.refusal is not None:
            r = decision.refusal
            raise ProxyError(r.code, f"{r.message} (rule {r.rule_id})", param=r.param)
        body = decision.body if decision.body is not None else body
        forward_raw: bytes | None = raw if not decision.changed else None
        if ctx.stream and isinstance(body.get("n"), int) and body["n"] > 1:
            raise ProxyError("invalid_request", "n > 1 is not supported with stream: true on this proxy", param="n")
        # Built before the reservation: a bad declared schema is a 400 that must not hold budget.
        rctx = await response_context(state, eff, ctx, body)
        plan, costed = await state.cost.admit(eff.cost, ctx.principal, ctx.conversation, body["model"], body,
                                              fail_open=eff.fail_open, now=now,
                                              model_allowed=lambda m: all(
                                                  shadow or m in allowed for _, shadow, allowed in eff.model_gates))
        ctx.plan = plan
        if costed is not body:
            body, forward_raw = costed, None
        if plan.downgraded_from:
            ctx.model_used = plan.model
            ctx.actions.append(f"downgraded:{plan.downgraded_from}->{plan.model}")
            state.telemetry.metrics.downgrade(plan.downgraded_from, plan.model)
        if plan.compressed:
            ctx.actions.append(f"compressed:{plan.compressed[0]}->{plan.compressed[1]}")
            state.telemetry.metrics.compression()
        if ctx.stream:
            from proxy.stream import stream_response

            return await stream_response(state, ctx, eff, rctx, body, forward_raw, idem)
        try:
            resp = await _complete(state, ctx, eff, rctx, body, forward_raw)
        except BaseException:
            if ctx.usage:  # the upstream answered (and billed) before the request failed: charge it
                await state.cost.settle(plan, ctx.usage, now=time.time())
            else:
                await state.cost.release(plan, now=time.time())
            raise
        await idem.complete(resp)
        return resp
    except BaseException:
        await idem.abort()
        raise


async def _complete(state: AppState, ctx: RequestContext, eff: Effective, rctx: ResponseContext,
                    body: dict[str, Any], forward_raw: bytes | None) -> Response:
    plan = ctx.plan
    assert plan is not None
    target = state.targets[plan.model]
    attempt_body = body
    repairs_left: int | None = None
    while True:
        data = await state.call_upstream(ctx, target, attempt_body, forward_raw)
        ctx.add_usage(data.get("usage") if isinstance(data.get("usage"), dict) else None)
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ProxyError("upstream_error", "upstream response has no choices")
        message = message_of(choices[0])
        text, other_text = message_text(message)
        decision = evaluate_response(eff, extract_calls(message), text, rctx, now=time.time(), other_text=other_text)
        budget = repair_budget(decision)
        if repairs_left is None:
            repairs_left = budget
        if budget > 0 and repairs_left > 0 and len(choices) == 1:
            repairs_left -= 1
            ctx.repairs += 1
            ctx.errors.extend(decision.errors)
            for v in decision.calls:
                if v.verdict == "invalid":
                    ctx.actions.append(f"repair_requested:{printable_name(v.call.name)}")
            if decision.output is not None and decision.output.verdict == "invalid":
                ctx.actions.append("repair_requested:output")
            attempt_body, forward_raw = repair_body(body, message, decision), None
            state.telemetry.metrics.repair("attempted")
            continue
        if ctx.repairs:
            outcome = "succeeded" if decision.effect != "deny" and not still_invalid(decision) else "exhausted"
            state.telemetry.metrics.repair(outcome)
            if outcome == "succeeded":
                for v in decision.calls:
                    ctx.actions.append(f"repaired:{printable_name(v.call.name)}")
                if not decision.calls:
                    ctx.actions.append("repaired:output")
        break
    ctx.absorb(decision)
    state.telemetry.response_decision(ctx, decision)
    await _apply(state, ctx, eff, decision, choices[0], message)
    if len(choices) > 1:
        for extra in choices[1:]:
            if not isinstance(extra, dict):
                raise ProxyError("upstream_error", "upstream response has a malformed choice")
            msg = message_of(extra)
            t, other = message_text(msg)
            d = evaluate_response(eff, extract_calls(msg), t, rctx, now=time.time(), other_text=other)
            ctx.absorb(d)
            await _apply(state, ctx, eff, d, extra, msg)
    if ctx.usage:
        data["usage"] = ctx.usage if ctx.repairs else data.get("usage", ctx.usage)
    await state.cost.settle(plan, ctx.usage or None, now=time.time())
    ctx.finish_reasons = [str(c.get("finish_reason")) for c in choices if isinstance(c, dict)]
    resp = Response(dumps(data), media_type="application/json", headers=ctx.headers())
    state.telemetry.record_output(ctx, [c.get("message") for c in choices if isinstance(c, dict)])
    state.telemetry.finish(ctx)
    return resp


async def _apply(state: AppState, ctx: RequestContext, eff: Effective, decision: Any, choice: dict[str, Any],
                 message: dict[str, Any]) -> None:
    out = decision.output
    escalation = refuse_or_escalate(eff, out)
    if escalation is not None:
        message["content"] = None
        message["tool_calls"] = [escalation]
        choice["finish_reason"] = "tool_calls"
        ctx.actions.append("escalated:output")
    elif out is not None and out.verdict == "rewrite":
        message["content"] = out.content
    if decision.calls:
        outcome = await resolve_calls(state.store, ctx, eff, decision.calls,
                                      approval_ttl_s=state.config.approval_ttl_s, fail_open=eff.fail_open)
        for name, result, _rule, _reason in ctx.tool_outcomes[-len(decision.calls):]:
            state.telemetry.metrics.tool_call(name, result)
        new_finish = rewrite_message(message, outcome)
        if new_finish is not None:
            choice["finish_reason"] = new_finish
