"""Streaming (SSE) responses: text flows live, tool calls are held until decided.

Text deltas are forwarded byte for byte as they arrive (no re-serialisation) unless the policy inspects
the output (schema, output rules, deny patterns), in which case every text the model streams (content,
refusal, reasoning, audio transcripts...) is held until the whole answer is checked; this trades
time-to-first-token for the guarantee, and what is held is bounded (``server.max_stream_buffer_bytes``,
else ``output_too_large``). Tool-call deltas are buffered per index until the model finishes, then
decided, and only then emitted, rewritten or removed: no byte of a blocked call reaches the client.

The upstream is always asked for ``include_usage`` so the request can be settled; the usage chunk is
passed on only if the client asked for it. A failure midway ends the stream with an SSE error event. A
client that disconnects or stops reading (:mod:`proxy.sse`) ends the relay at once: the upstream request
is closed, the request is charged for what the upstream produced until then, grants consumed for tool
calls the client never received are given back, and buffers are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from proxy import upstream_shape as shape
from proxy.errors import ProxyError, sse_error_event
from proxy.idempotency import IdemHandle
from proxy.reqctx import RequestContext
from proxy.respond import (
    blocked_text,
    extract_calls,
    give_back,
    message_of,
    message_text,
    refuse_or_escalate,
    repair_body,
    repair_budget,
    still_invalid,
)
from proxy.sse import ENDED_COMPLETED, RelayResponse
from proxy.texts import CALL_KEYS, strings
from rules.decision import ToolCallIn
from rules.evaluate import printable_name
from rules.evaluate_response import ResponseContext, evaluate_response

if TYPE_CHECKING:
    from proxy.state import AppState
    from rules.effective import Effective

log = logging.getLogger("guardproxy")
DONE = b"data: [DONE]\n\n"


def _event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class _Relay:
    """What one stream has read so far, and the events still owed to the client."""

    def __init__(self, state: AppState, ctx: RequestContext, eff: Effective, rctx: ResponseContext,
                 body: dict[str, Any], client_usage: bool, record: bool) -> None:
        self.state, self.ctx, self.eff, self.rctx, self.body = state, ctx, eff, rctx, body
        self.client_usage = client_usage
        self.buffer_text = eff.inspects_output or rctx.response_schema is not None
        self.max_depth = state.config.server.max_body_depth
        self.limit = state.config.server.max_stream_buffer_bytes
        self.calls: dict[int, dict[str, Any]] = {}
        self.legacy: dict[str, Any] | None = None
        self.text: list[str] = []  # content fragments (held when buffering; kept for billing otherwise)
        self.other: dict[tuple[Any, ...], list[str]] = {}  # every other text, by field path
        self.held: list[dict[str, Any]] = []  # buffering: the non-content deltas, replayed once checked
        self.size = 0  # bytes of text read (held or kept for billing)
        self.unkept = 0  # bytes of pass-through text past the bound, billed by size
        self.template: dict[str, Any] | None = None
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.recorded: list[bytes] | None = [] if record else None  # for an Idempotency-Key replay
        self.recorded_size = 0
        self.calls_at = 0  # index of the first closing event that may carry a decided tool call
        self.calls_delivered = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        t = self.template or {"id": "chatcmpl-guardproxy", "created": int(time.time()), "model": self.ctx.model_used}
        out = {"id": t.get("id"), "object": "chat.completion.chunk", "created": t.get("created"),
               "model": t.get("model"), "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                    "logprobs": None}]}
        if "system_fingerprint" in t:
            out["system_fingerprint"] = t["system_fingerprint"]
        return out

    def _keep(self, text: str) -> bool:
        """Account for ``text`` read from the upstream; False when it is past the bound (not kept)."""
        n = len(text)
        if self.size + n > self.limit:
            if self.buffer_text:
                raise ProxyError("output_too_large", f"the output grew past {self.limit} bytes before it "
                                 "could be checked")
            self.unkept += n
            return False
        self.size += n
        return True

    def take(self, payload: bytes) -> bytes | None:
        """Absorb one upstream chunk; return the bytes to forward now, if any."""
        chunk = shape.chunk(shape.parse(payload, max_depth=self.max_depth))
        if self.template is None:
            self.template = chunk
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]
        choices = chunk.get("choices") or []
        if not choices:
            return None  # the usage chunk: re-emitted at the end if the client asked for it
        ch = choices[0]  # n > 1 streams are refused; other choices of a hostile upstream are dropped
        delta = ch.get("delta") or {}
        finish = ch.get("finish_reason")
        content = delta.get("content")
        if isinstance(content, str) and content and self._keep(content):
            self.text.append(content)
        tool_deltas = delta.get("tool_calls")
        for td in tool_deltas or ():
            self._take_tool_delta(td)
        fc = delta.get("function_call")
        if fc is not None:
            if self.legacy is None:
                self.legacy = {"name": "", "args": []}
            self.legacy["name"] += fc.get("name") or ""
            self.legacy["args"].append(fc.get("arguments") or "")
        rest = {k: v for k, v in delta.items() if k not in CALL_KEYS and k != "content"}
        for path, text in strings(rest):
            if self._keep(text):
                self.other.setdefault(path, []).append(text)
        if finish:
            self.finish = finish
        if self.buffer_text:
            role = rest.pop("role", None)
            if any(v is not None for v in rest.values()):
                self.held.append(rest)
            return _event(self._chunk({"role": role, "content": ""})) if role is not None else None
        if not tool_deltas and fc is None and len(choices) == 1 and not finish:
            return b"data: " + payload + b"\n\n"  # the fast path: forward as received
        # Tool-call deltas are held and the finish chunk is sent at the end: forward the rest of the delta.
        out = {**rest, "content": content} if isinstance(content, str) and content else rest
        return _event(self._chunk(out)) if any(v is not None for v in out.values()) else None

    def _take_tool_delta(self, td: dict[str, Any]) -> None:
        fn = td.get("function") or {}
        slot = self.calls.setdefault(td.get("index", 0), {"id": None, "name": "", "args": []})
        if td.get("id"):
            slot["id"] = td["id"]
        slot["name"] += fn.get("name") or ""
        slot["args"].append(fn.get("arguments") or "")
        self.size += len(fn.get("arguments") or "")
        if self.size > self.limit:
            raise ProxyError("output_too_large", f"tool-call arguments grew past {self.limit} bytes")

    def billable_text(self) -> str:
        """Everything the model produced so far: text, other text fields, tool-call names and arguments."""
        parts = list(self.text)
        for fragments in self.other.values():
            parts.extend(fragments)
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
        held = self.held
        if repair_budget(decision) > 0:
            decision, content, calls, held = await self._repair(decision, calls, content)
        ctx.absorb(decision)
        st.telemetry.response_decision(ctx, decision)
        out: list[bytes] = []
        finish = self.finish or "stop"
        o = decision.output
        escalation = refuse_or_escalate(o)
        if escalation is not None:  # as in the non-streamed path: the invalid text becomes an escalation call
            ctx.actions.append("escalated:output")
            content, held = None, []
        out.extend(_event(self._chunk(delta)) for delta in held)  # reasoning, refusal, audio: checked now
        if content is not None:
            text = o.content if o is not None and o.verdict == "rewrite" and o.content is not None else content
            if text:
                out.append(_event(self._chunk({"content": text})))
        self.calls_at = len(out)
        if decision.calls:
            outcome = await st.resolve_calls(ctx, eff, decision.calls)
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

    async def _repair(self, decision: Any, calls: list[ToolCallIn],
                      content: str | None) -> tuple[Any, Any, Any, list[dict[str, Any]]]:
        """Ask again (non-streamed) with the validator's errors; the first valid answer is emitted."""
        st, ctx = self.state, self.ctx
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls and not calls[0].legacy:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        plan = ctx.plan
        assert plan is not None
        held: list[dict[str, Any]] = self.held
        for _ in range(repair_budget(decision)):
            ctx.repairs += 1
            st.telemetry.metrics.repair("attempted")
            attempt = repair_body(self.body, message, decision)
            data = await st.call_upstream(ctx, st.targets[plan.model], attempt, None,
                                          prompt_tokens=await st.cost.count_prompt(plan.model, attempt))
            choice = data["choices"][0]
            message = message_of(choice)
            calls = extract_calls(message)
            text, other_text = message_text(message, self.eff)
            content = text if self.buffer_text or not calls else None
            rest = {k: v for k, v in message.items() if k not in CALL_KEYS and k not in ("content", "role")}
            held = [rest] if rest else []
            self.finish = choice.get("finish_reason") or self.finish
            decision = evaluate_response(self.eff, calls, content, self.rctx, now=time.time(), other_text=other_text)
            if not still_invalid(decision):
                st.telemetry.metrics.repair("succeeded")
                if calls:
                    ctx.actions.extend(f"repaired:{printable_name(c.name)}" for c in calls)
                else:
                    ctx.actions.append("repaired:output")
                return decision, content, calls, held
        st.telemetry.metrics.repair("exhausted")
        return decision, content, calls, held

    def record(self, event: bytes) -> None:
        if self.recorded is None:
            return
        self.recorded_size += len(event)
        if self.recorded_size > self.limit:
            self.recorded = None  # too big to keep for a replay: the key is released instead
        else:
            self.recorded.append(event)


async def stream_response(state: AppState, ctx: RequestContext, eff: Effective, rctx: ResponseContext,
                          body: dict[str, Any], forward_raw: bytes | None, idem: IdemHandle) -> RelayResponse:
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
    relay = _Relay(state, ctx, eff, rctx, body, client_usage, record=idem.key is not None)
    resp_headers = ctx.headers()
    outcome: dict[str, Any] = {"completed": False, "error": None}

    async def gen() -> AsyncIterator[bytes]:
        try:
            async for payload in events:
                if payload == b"[DONE]":
                    break
                out = relay.take(payload)
                if out is not None:
                    relay.record(out)
                    yield out
            usage = state.take_usage(ctx, relay.usage, plan.prompt_tokens)
            state.telemetry.upstream_done(span, usage=usage)
            closing = await relay.closing_events()
            for i, ev in enumerate(closing):
                relay.record(ev)
                yield ev
                if i >= relay.calls_at:
                    relay.calls_delivered = True  # the consumer came back for more: the call was sent
            outcome["completed"] = True
        except ProxyError as err:
            outcome["error"] = err
            ctx.status, ctx.error_code = 200, err.code
            yield sse_error_event(err, ctx.decision_id)
        except Exception:
            log.exception("unexpected error in the stream of %s", ctx.decision_id)
            bug = ProxyError("internal_error", "internal error; see the proxy log")
            outcome["error"] = bug
            ctx.status, ctx.error_code = 200, bug.code
            yield sse_error_event(bug, ctx.decision_id)

    def on_end(ended: str) -> None:
        # Runs however the stream ended, also when the client left before the first byte: the rest runs
        # in a task, since the request's own task may be cancelled.
        if ended != ENDED_COMPLETED:
            ctx.actions.append(ended)
        error = outcome["error"]
        state.telemetry.upstream_done(span, error=error)  # no-op unless the upstream stream broke
        task = asyncio.ensure_future(_finish(state, ctx, idem, relay, resp_headers, bool(outcome["completed"]),
                                             error, events))
        state.background.append(task)
        task.add_done_callback(lambda t: state.background.remove(t) if t in state.background else None)

    return RelayResponse(gen(), resp_headers, write_timeout_s=state.config.server.stream_write_timeout_s,
                         on_end=on_end)


async def _finish(state: AppState, ctx: RequestContext, idem: IdemHandle, relay: _Relay, headers: dict[str, str],
                  completed: bool, error: ProxyError | None, events: Any) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):  # a broken upstream stream is already reported as the error
            await aclose()  # closes the upstream request now: the model stops generating
    plan = ctx.plan
    assert plan is not None
    if ctx.effects and not relay.calls_delivered:
        await give_back(state.store, ctx)
    # Without usage from the upstream (it was cut off), the text read is counted; what went past the buffer
    # bound unkept is billed at one token per byte, an upper bound.
    await state.cost.settle(plan, ctx.usage or None, streamed_text=relay.billable_text(),
                            extra_output_tokens=relay.unkept, now=time.time())
    relay.text, relay.other, relay.held, relay.calls = [], {}, [], {}  # drop buffers before the audit work
    if completed and relay.recorded is not None:
        await idem.complete_stream(200, dict(headers), relay.recorded)
    else:
        await idem.abort()
    state.telemetry.finish(ctx, error=error)
