"""``POST /v1/chat/completions``: the request path.

auth -> principal -> body (size, strict JSON, types) -> compiled policy for the principal -> request
decision (strip, clamp, refuse) -> cost (price, ladder, reserve) -> upstream -> response decision (tool
calls, schemas, output rules, repair) -> settle -> headers, metrics, trace, audit.

Every request leaves the same record whatever happens to it: a refusal (401 included) or an unexpected
error still gets the error envelope with a decision id, one audit line, its metrics and an ended span.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from proxy.body import read_json_body, validate_chat_body
from proxy.complete import complete
from proxy.costing import conversation_id
from proxy.declared import check_offered_tools, response_context
from proxy.errors import ProxyError
from proxy.reqctx import ANONYMOUS, RequestContext
from proxy.respond import give_back
from rules.evaluate import evaluate_request

if TYPE_CHECKING:
    from proxy.state import AppState

CONVERSATION_HEADER = "x-guardproxy-conversation-id"
log = logging.getLogger("guardproxy")


async def chat_completions(request: Request) -> Response:
    state: AppState = request.app.state.gp
    try:
        principal = state.keys.principal(request.headers.get("authorization"))
    except ProxyError as err:
        return _refuse(state, RequestContext(ANONYMOUS, authenticated=False), err)
    ctx = RequestContext(principal, decision_id=state.decision_ids.issue(principal.key_id))
    try:
        return await _handle(state, request, ctx)
    except ProxyError as err:
        return _refuse(state, ctx, err)
    except Exception:
        log.exception("unexpected error in %s", ctx.decision_id)
        return _refuse(state, ctx, ProxyError("internal_error", "internal error; see the proxy log"))


def _refuse(state: AppState, ctx: RequestContext, err: ProxyError) -> Response:
    ctx.status, ctx.error_code = err.status, err.code
    if err.code == "budget_exceeded":
        state.telemetry.metrics.budget_refusal(str((err.extra.get("budget") or {}).get("scope", "")))
    resp = state.error_response(err, ctx)
    state.telemetry.finish(ctx, error=err)
    return resp


async def _handle(state: AppState, request: Request, ctx: RequestContext) -> Response:
    srv = state.config.server
    raw, body = await read_json_body(request, srv.max_body_bytes, max_depth=srv.max_body_depth,
                                     timeout_s=srv.body_read_timeout_s)
    validate_chat_body(body)
    check_offered_tools(body, srv.max_tools)
    ctx.model_asked = ctx.model_used = body["model"]
    ctx.stream = bool(body.get("stream"))
    if state.config.route(body["model"]) is None:
        raise ProxyError("model_not_found", f"The model {body['model']!r} does not exist on this proxy.",
                         param="model")
    policies = state.policies.current
    if policies is None:
        raise ProxyError("internal_error", "no policy set loaded")
    p = ctx.principal
    eff = policies.for_principal(p.key_id, p.team, p.org)
    ctx.revision = policies.revision
    ctx.conversation = conversation_id(p, body, request.headers.get(CONVERSATION_HEADER))
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
        decision = evaluate_request(eff, body, p, now=now)
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
        plan, costed = await state.cost.admit(eff.cost, p, ctx.conversation, body["model"], body,
                                              fail_open=eff.fail_open, now=now,
                                              model_allowed=lambda m: all(
                                                  shadow or m in allowed for _, shadow, allowed in eff.model_gates),
                                              shadow=eff.shadow_cost)
        ctx.plan = plan
        ctx.would.extend(plan.would)
        # Response rules see the route that actually serves the request (after a ladder downgrade).
        rctx = dataclasses.replace(rctx, model=plan.model)
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
            resp = await complete(state, ctx, eff, rctx, body, forward_raw, replayable=idem.key is not None)
        except BaseException:
            if ctx.effects:  # the calls were decided but the answer never left: their grants go back
                await give_back(state.store, ctx)
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
