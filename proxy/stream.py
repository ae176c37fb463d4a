"""Streaming (SSE) responses: text flows live, tool calls are held until decided.

Text deltas are forwarded byte for byte as they arrive (no re-serialisation)
unless the policy inspects the output (schema, output rules, deny patterns),
in which case the content is buffered until it validates; this trades
time-to-first-token for the guarantee. Tool-call deltas are buffered per index
until the model finishes, then decided, and only then emitted, rewritten or
removed: no byte of a blocked call reaches the client. Upstream is always asked
for ``include_usage`` so the request can be settled; the usage chunk is passed
on only if the client asked for it. A failure midway ends the stream with an
SSE error event; a client that disconnects is still charged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import StreamingResponse

from proxy.errors import ProxyError, sse_error_event
from proxy.idempotency import IdemHandle
from proxy.reqctx import RequestContext
from proxy.respond import (
    blocked_text,
    extract_calls,
    message_of,
    message_text,
    refuse_or_escalate,
    repair_body,
    repair_budget,
    resolve_calls,
    still_invalid,
)
from rules.decision import ToolCallIn
from rules.evaluate import printable_name
from rules.evaluate_response import ResponseContext, evaluate_response

if TYPE_CHECKING:
    from proxy.state import AppState
    from rules.effective import Effective

DONE = b"data: [DONE]\n\n"
_OTHER_TEXT = ("refusal", "reasoning_content", "reasoning")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProxyError("upstream_error", "upstream sent a malformed stream chunk")
    return value


def _event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class _Relay:
    def __init__(self, state: AppState, ctx: RequestContext, eff: Effective, rctx: ResponseContext,
                 body: dict[str, Any], idem: IdemHandle, client_usage: bool) -> None:
        self.state, self.ctx, self.eff, self.rctx, self.body, self.idem = state, ctx, eff, rctx, body, idem
        self.client_usage = client_usage
        self.buffer_text = eff.inspects_output or rctx.response_schema is not None
        self.calls: dict[int, dict[str, Any]] = {}
        self.legacy: dict[str, Any] | None = None
        self.text: list[str] = []
        self.template: dict[str, Any] | None = None
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.recorded: list[bytes] = []
        self.other: dict[str, list[str]] = {}  # refusal / reasoning text, held with the content when buffering

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        t = self.template or {"id": "chatcmpl-guardproxy", "created": int(time.time()), "model": self.ctx.model_used}
        out = {"id": t.get("id"), "object": "chat.completion.chunk", "created": t.get("created"),
               "model": t.get("model"), "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                    "logprobs": None}]}
        if "system_fingerprint" in t:
            out["system_fingerprint"] = t["system_fingerprint"]
        return out

    def _take(self, payload: bytes) -> bytes | None:
        """Absorb one upstream chunk; return the bytes to forward now, if any."""
        chunk = orjson.loads(payload)
        if not isinstance(chunk, dict):
            raise ProxyError("upstream_error", "upstream sent a malformed stream chunk")
        if self.template is None:
            self.template = chunk
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices") or []
        if not choices:
            return None  # the usage chunk: re-emitted at the end if the client asked for it
        ch = choices[0]
        delta = ch.get("delta") if isinstance(ch, dict) else None
        if delta is None:
            delta = {}
        if not isinstance(delta, dict):
            raise ProxyError("upstream_error", "upstream sent a malformed stream chunk")
        finish = ch.get("finish_reason")
        content = delta.get("content")
        if isinstance(content, str) and content:
            self.text.append(content)
        tool_deltas = delta.get("tool_calls")
        fc = delta.get("function_call")
        if tool_deltas:
            if not isinstance(tool_deltas, list):
                raise ProxyError("upstream_error", "upstream sent malformed tool-call deltas")
            for td in tool_deltas:
                self._take_tool_delta(td)
        if fc is not None:
            if not isinstance(fc, dict):
                raise ProxyError("upstream_error", "upstream sent a malformed function_call delta")
            if self.legacy is None:
                self.legacy = {"name": "", "args": []}
            self.legacy["name"] += _text(fc.get("name"))
            self.legacy["args"].append(_text(fc.get("arguments")))
        for key in _OTHER_TEXT:
            value = delta.get(key)
            if isinstance(value, str) and value:
                self.other.setdefault(key, []).append(value)
        if finish:
            self.finish = finish
            if isinstance(content, str) and content and not self.buffer_text:
                return _event(self._chunk({"content": content}))
            return None
        if not tool_deltas and fc is None and not self.buffer_text and len(choices) == 1:
            return b"data: " + payload + b"\n\n"  # the fast path: forward as received
        rest = {k: v for k, v in delta.items() if k not in ("tool_calls", "function_call")}
        if self.buffer_text:
            rest.pop("content", None)
            for key in _OTHER_TEXT:
                rest.pop(key, None)
            if "role" in rest:
                rest["content"] = ""
        if rest:
            return _event(self._chunk(rest))
        return None

    def _take_tool_delta(self, td: Any) -> None:
        if not isinstance(td, dict):
            raise ProxyError("upstream_error", "upstream sent a malformed tool-call delta")
        idx = td.get("index", 0)
        fn = td.get("function") or {}
        if not isinstance(idx, int) or isinstance(idx, bool) or not isinstance(fn, dict):
            raise ProxyError("upstream_error", "upstream sent a malformed tool-call delta")
        slot = self.calls.setdefault(idx, {"id": None, "name": "", "args": []})
        if td.get("id"):
            slot["id"] = _text(td["id"])
        slot["name"] += _text(fn.get("name"))
        slot["args"].append(_text(fn.get("arguments")))

    def billable_text(self) -> str:
        """Everything the model produced so far, tool-call arguments included (charged on disconnect)."""
        parts = list(self.text)
        for s in self.calls.values():
            parts.extend((s["name"], *s["args"]))
        if self.legacy is not None:
            parts.extend((self.legacy["name"], *self.legacy["args"]))
        return "".join(parts)

    def tool_calls_in(self) -> list[ToolCallIn]:
        out = [ToolCallIn(i, s["id"], s["name"], "".join(s["args"])) for i, s in sorted(self.calls.items())]
        if self.legacy is not None:
            out.append(ToolCallIn(0, None, self.legacy["name"], "".join(self.legacy["args"]), legacy=True))
        return out

    async def closing_events(self) -> list[bytes]:
        """Decide everything that was held back and produce the remaining events."""
        st, ctx, eff = self.state, self.ctx, self.eff
        calls = self.tool_calls_in()
        content = "".join(self.text) if self.buffer_text else None
        other_text = ["".join(v) for v in self.other.values()] if self.buffer_text else []
        decision = evaluate_response(eff, calls, content, self.rctx, now=time.time(), other_text=other_text)
        if repair_budget(decision) > 0:
            decision, content, calls = await self._repair(decision, calls, content)
        ctx.absorb(decision)
        st.telemetry.response_decision(ctx, decision)
        out: list[bytes] = []
        finish = self.finish or "stop"
        o = decision.output
        escalation = refuse_or_escalate(eff, o)
        if escalation is not None:  # as in the non-streamed path: the invalid text becomes an escalation call
            ctx.actions.append("escalated:output")
            content = None
        if content is not None:
            text = o.content if o is not None and o.verdict == "rewrite" and o.content is not None else content
            if text:
                out.append(_event(self._chunk({"content": text})))
            for key, parts in self.other.items():  # held refusal / reasoning text, now cleared
                out.append(_event(self._chunk({key: "".join(parts)})))
        if decision.calls:
            outcome = await resolve_calls(st.store, ctx, eff, decision.calls,
                                          approval_ttl_s=st.config.approval_ttl_s, fail_open=eff.fail_open)
            for name, result, _r, _x in ctx.tool_outcomes[-len(decision.calls):]:
                st.telemetry.metrics.tool_call(name, result)
            for i, k in enumerate(outcome.kept):
                if k["legacy"]:
                    out.append(_event(self._chunk({"function_call": {"name": k["name"],
                                                                     "arguments": k["arguments"]}})))
                else:
                    out.append(_event(self._chunk({"tool_calls": [{
                        "index": i, "id": k["id"], "type": "function",
                        "function": {"name": k["name"], "arguments": k["arguments"]}}]})))
            if not outcome.kept:
                out.append(_event(self._chunk({"content": blocked_text(outcome.notes)})))
                finish = "stop"
        if escalation is not None:
            index = len(outcome.kept) if decision.calls else 0
            out.append(_event(self._chunk({"tool_calls": [{"index": index, **escalation}]})))
            finish = "tool_calls"
        out.append(_event(self._chunk({}, finish)))
        ctx.finish_reasons = [finish]
        if self.client_usage:
            usage_chunk = dict(self._chunk({}))
            usage_chunk["choices"] = []
            usage_chunk["usage"] = ctx.usage or self.usage or {}
            out.append(_event(usage_chunk))
        out.append(DONE)
        return out

    async def _repair(self, decision: Any, calls: list[ToolCallIn], content: str | None) -> tuple[Any, Any, Any]:
        """Ask again (non-streamed) with the validator's errors; the first valid answer is emitted."""
        st, ctx = self.state, self.ctx
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls and not calls[0].legacy:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        for _ in range(repair_budget(decision)):
            ctx.repairs += 1
            st.telemetry.metrics.repair("attempted")
            plan = ctx.plan
            assert plan is not None
            data = await st.call_upstream(ctx, st.targets[plan.model], repair_body(self.body, message, decision), None)
            ctx.add_usage(data.get("usage") if isinstance(data.get("usage"), dict) else None)
            choices = data.get("choices")
            choice = choices[0] if isinstance(choices, list) and choices else None
            if not isinstance(choice, dict):
                raise ProxyError("upstream_error", "upstream response has no choices")
            message = message_of(choice)
            calls = extract_calls(message)
            text, other_text = message_text(message)
            content = text if self.buffer_text or not calls else None
            self.finish = choice.get("finish_reason") or self.finish
            decision = evaluate_response(self.eff, calls, content, self.rctx, now=time.time(), other_text=other_text)
            if not still_invalid(decision):
                st.telemetry.metrics.repair("succeeded")
                if calls:
                    ctx.actions.extend(f"repaired:{printable_name(c.name)}" for c in calls)
                else:
                    ctx.actions.append("repaired:output")
                return decision, content, calls
        st.telemetry.metrics.repair("exhausted")
        return decision, content, calls


async def stream_response(state: AppState, ctx: RequestContext, eff: Effective, rctx: ResponseContext,
                          body: dict[str, Any], forward_raw: bytes | None, idem: IdemHandle) -> StreamingResponse:
    plan = ctx.plan
    assert plan is not None
    so_raw = body.get("stream_options")
    so: dict[str, Any] = so_raw if isinstance(so_raw, dict) else {}
    client_usage = bool(so.get("include_usage"))
    if not client_usage:
        body = {**body, "stream_options": {**so, "include_usage": True}}
        forward_raw = None
    target = state.targets[plan.model]
    headers: dict[str, str] = {}
    ctx.upstream_attempts += 1
    span = state.telemetry.upstream_span(ctx, target.model, headers)
    try:
        events = await state.upstreams.stream(target, body, forward_raw, headers)
    except BaseException as exc:
        state.telemetry.upstream_done(span, error=exc)
        await state.cost.release(plan, now=time.time())
        raise
    relay = _Relay(state, ctx, eff, rctx, body, idem, client_usage)
    resp_headers = ctx.headers()
    started = False

    def cleanup(completed: bool, error: ProxyError | None) -> None:
        # Runs on success, on error and when the client goes away (CancelledError / GeneratorExit), and also
        # when the client left before the first byte (the body generator never started): settle in a task,
        # since the request's own task may be cancelled.
        state.telemetry.upstream_done(span, error=error)  # no-op unless the upstream stream broke
        settle = state.cost.settle(plan, ctx.usage or None, streamed_text=relay.billable_text(), now=time.time())
        task = asyncio.ensure_future(_finish(state, ctx, idem, relay, resp_headers, completed, error, settle, events))
        state.background.append(task)
        task.add_done_callback(lambda t: state.background.remove(t) if t in state.background else None)

    async def gen() -> AsyncIterator[bytes]:
        nonlocal started
        started = True
        completed = False
        error: ProxyError | None = None
        try:
            async for payload in events:
                if payload == b"[DONE]":
                    break
                out = relay._take(payload)
                if out is not None:
                    relay.recorded.append(out)
                    yield out
            state.telemetry.upstream_done(span, usage=relay.usage)
            ctx.add_usage(relay.usage)
            for ev in await relay.closing_events():
                relay.recorded.append(ev)
                yield ev
            completed = True
        except ProxyError as err:
            error = err
            ctx.status, ctx.error_code = 200, err.code
            yield sse_error_event(err, ctx.decision_id)
        except (orjson.JSONDecodeError, ValueError, TypeError, AttributeError, KeyError):
            error = ProxyError("upstream_error", "upstream sent a malformed stream chunk")
            yield sse_error_event(error, ctx.decision_id)
        finally:
            cleanup(completed, error)

    def never_started() -> None:
        if not started:
            cleanup(False, None)

    return _GuardedStream(gen(), never_started, media_type="text/event-stream", headers=resp_headers)


class _GuardedStream(StreamingResponse):
    """A streaming response that still settles and closes upstream if the body was never iterated."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Any, **kw: Any) -> None:
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _finish(state: AppState, ctx: RequestContext, idem: IdemHandle, relay: _Relay, headers: dict[str, str],
                  completed: bool, error: ProxyError | None, settle: Any, events: Any) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()  # releases the upstream connection now rather than at garbage collection
    await settle
    if completed:
        await idem.complete_stream(200, {k: v for k, v in headers.items()}, relay.recorded)
    else:
        await idem.abort()
    state.telemetry.finish(ctx, error=error)
