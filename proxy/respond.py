"""Applying a response decision: tool calls kept, removed, rewritten or held; content rewritten.

Shared by the streaming and non-streaming paths. State the pure evaluator
cannot read (approvals, once-per-conversation markers) is consulted here,
after the decision, and written back.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.errors import ProxyError
from proxy.reqctx import RequestContext
from proxy.stores import Approval, Store, StoreUnavailable
from proxy.texts import message_texts
from rules.decision import CallVerdict, OutputVerdict, ResponseDecision, ToolCallIn
from rules.effective import Effective
from rules.evaluate import printable_name


def extract_calls(message: dict[str, Any]) -> list[ToolCallIn]:
    """The tool calls of an assistant message (modern ``tool_calls`` or legacy ``function_call``)."""
    out = []
    for i, tc in enumerate(message.get("tool_calls") or ()):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict):
            out.append(ToolCallIn(i, None, "", ""))
            continue
        name, args = fn.get("name"), fn.get("arguments")
        out.append(ToolCallIn(i, tc.get("id"), name if isinstance(name, str) else "",
                              args if isinstance(args, str) else ""))
    fc = message.get("function_call")
    if isinstance(fc, dict):
        name, args = fc.get("name"), fc.get("arguments")
        out.append(ToolCallIn(0, None, name if isinstance(name, str) else "",
                              args if isinstance(args, str) else "", legacy=True))
    return out


@dataclass
class Outcome:
    """What survives of one assistant message's tool calls."""

    kept: list[dict[str, Any]] = field(default_factory=list)  # {"index","id","name","arguments","legacy"}
    notes: list[str] = field(default_factory=list)



def _kept(call: ToolCallIn, name: str, arguments: str) -> dict[str, Any]:
    return {"index": call.index, "id": call.id, "name": name, "arguments": arguments, "legacy": call.legacy}


async def resolve_calls(store: Store, ctx: RequestContext, verdicts: tuple[CallVerdict, ...],
                        *, approval_ttl_s: int, fail_open: bool) -> Outcome:
    """Turn verdicts into the calls the agent gets; consult approvals and once markers."""
    out = Outcome()
    for v in verdicts:
        c = v.call
        if v.verdict == "allow":
            if await _repeated(store, ctx, v, fail_open):
                reason = f"{c.name} with these arguments was already called in this conversation"
                ctx.actions.append(f"tool_denied:{c.name}")
                ctx.rule_ids.append("once_per_conversation")
                ctx.tool_outcomes.append((c.name, "denied", "once_per_conversation", reason))
                out.notes.append(f"{c.name}: {reason} (once_per_conversation)")
                continue
            ctx.tool_outcomes.append((c.name, "allowed", None, ""))
            out.kept.append(_kept(c, c.name, c.arguments))
        elif v.verdict == "escalate":
            # The escalation call was decided through every layer: it is kept, held, or (a repeat) removed.
            then = v.then
            assert then is not None
            ctx.tool_outcomes.append((c.name, "escalated", v.rule_id, v.reason))
            if then.verdict == "hold":
                if await _hold(store, ctx, then, approval_ttl_s=approval_ttl_s):
                    out.kept.append(_kept(c, then.call.name, then.call.arguments))
                else:
                    out.notes.append(f"{c.name}: escalated to {then.call.name}, which awaits human approval "
                                     f"({then.rule_id}: {then.reason}{_approval_ref(ctx)})")
            elif await _repeated(store, ctx, then, fail_open):
                out.notes.append(f"{c.name}: escalated to {then.call.name}, which was already called with these "
                                 "arguments in this conversation (once_per_conversation)")
                ctx.rule_ids.append("once_per_conversation")
            else:
                out.kept.append(_kept(c, then.call.name, then.call.arguments))
        elif v.verdict == "hold":
            kept = await _hold(store, ctx, v, approval_ttl_s=approval_ttl_s)
            if kept:
                out.kept.append(_kept(c, c.name, c.arguments))
            else:
                out.notes.append(f"{c.name}: awaits human approval ({v.rule_id}: {v.reason}{_approval_ref(ctx)})")
        else:
            outcome = "schema_denied" if v.verdict == "invalid" else "denied"
            if v.verdict == "invalid":
                ctx.actions.append(f"schema_denied:{printable_name(c.name)}")
            ctx.tool_outcomes.append((c.name, outcome, v.rule_id, v.reason))
            detail = "; ".join(v.errors) if v.errors else v.reason
            out.notes.append(f"{printable_name(c.name)}: blocked by {v.rule_id} ({detail})")
    return out


def _approval_ref(ctx: RequestContext) -> str:
    return f"; approval id {ctx.approval_ids[-1]}" if ctx.approval_ids else ""


async def _repeated(store: Store, ctx: RequestContext, v: CallVerdict, fail_open: bool) -> bool:
    """Whether a once-per-conversation call repeats one already made in this conversation (marking it
    now otherwise). A shadow policy's once rule marks too, and reports ``would_block_once:<tool>``."""
    if not (v.once or v.shadow_once) or not v.args_hash:
        return False
    first = await _first_time(store, ctx, v, fail_open if v.once else True)
    if v.once:
        return not first
    if not first:
        ctx.would.append(f"would_block_once:{v.call.name}")
    return False


def _scoped_hash(ctx: RequestContext, v: CallVerdict) -> str:
    # Conversation ids are chosen by clients, so two keys may send the same one: markers and approvals are
    # per principal, or one key could spend another's human approval. The hash is fixed-length hex, so
    # "<key id>:<hash>" cannot alias even though key ids may contain ":".
    return f"{ctx.principal.key_id}:{v.args_hash or ''}"


async def _first_time(store: Store, ctx: RequestContext, v: CallVerdict, fail_open: bool) -> bool:
    call_hash = _scoped_hash(ctx, v)
    try:
        first = await store.mark_once(ctx.conversation, call_hash, ttl_s=7 * 86400)
    except StoreUnavailable:
        ctx.degraded = True
        return fail_open
    if first:
        ctx.effects.append(Consumed("once", ctx.conversation, call_hash))
    return first


async def _hold(store: Store, ctx: RequestContext, v: CallVerdict, *, approval_ttl_s: int) -> bool:
    """True when a prior human approval covers exactly this call (consumed now); else record a pending one."""
    c, now = v.call, time.time()
    try:
        prior = await store.approval_find(ctx.conversation, c.name, _scoped_hash(ctx, v), now=now)
        if prior is not None and prior.status == "approved" and await store.approval_consume(prior.id, now=now):
            ctx.effects.append(Consumed("approval", ctx.conversation, prior.id))
            ctx.actions.append(f"approved:{c.name}")
            ctx.approval_ids.append(prior.id)
            ctx.tool_outcomes.append((c.name, "allowed", v.rule_id, f"approved by {prior.decided_by or 'reviewer'}"))
            return True
        if prior is not None and prior.status in ("pending", "rejected"):
            ctx.approval_ids.append(prior.id)
            ctx.tool_outcomes.append((c.name, "held", v.rule_id, f"approval {prior.status}"))
            return False
        a = Approval(id="apr_" + os.urandom(8).hex(), principal=ctx.principal.key_id, team=ctx.principal.team or "",
                     conversation=ctx.conversation, tool=c.name, args_hash=_scoped_hash(ctx, v),
                     rule_id=v.rule_id or "", reason=v.reason, created_at=now, expires_at=now + approval_ttl_s,
                     status="pending", note=None, decided_by=None, decided_at=None)
        await store.approval_create(a)
        ctx.actions.append(f"approval_requested:{c.name}")
    except StoreUnavailable:
        ctx.degraded = True
        ctx.tool_outcomes.append((c.name, "held", v.rule_id, "store unavailable"))
        return False
    ctx.approval_ids.append(a.id)
    ctx.tool_outcomes.append((c.name, "held", v.rule_id, v.reason))
    return False


@dataclass(frozen=True)
class Consumed:
    """A one-time grant used up by this response: a once-per-conversation marker or an approval. Given back
    (:func:`give_back`) when the response that carries the call is never delivered."""

    kind: str  # "once" | "approval"
    conversation: str
    ref: str  # the scoped call hash, or the approval id


async def give_back(store: Store, ctx: RequestContext) -> None:
    """Undo every grant this request consumed: its response did not reach the agent (the upstream or
    the client failed after the calls were decided), so the agent may ask again and get them."""
    effects, ctx.effects = ctx.effects, []
    for e in effects:
        try:
            if e.kind == "once":
                await store.unmark_once(e.conversation, e.ref)
            else:
                await store.approval_unconsume(e.ref, now=time.time())
        except StoreUnavailable:
            ctx.degraded = True  # the marker expires or the approval stays used: fail closed
        ctx.actions.append(f"given_back:{e.kind}")


def blocked_text(notes: list[str]) -> str:
    return "[guardproxy] The requested action was not performed. " + " ".join(notes)


def rewrite_message(message: dict[str, Any], outcome: Outcome) -> str | None:
    """Apply ``outcome`` to a non-streamed assistant message in place; return a new finish_reason or None."""
    # Both fields are rebuilt from the decided calls only: nothing the model sent (a denied call in the other
    # field, extra keys such as ``custom`` blocks on a kept call) is copied through.
    modern = [k for k in outcome.kept if not k["legacy"]]
    legacy = [k for k in outcome.kept if k["legacy"]]
    message.pop("tool_calls", None)
    message.pop("function_call", None)
    if modern:
        message["tool_calls"] = [{"id": k["id"], "type": "function",
                                  "function": {"name": k["name"], "arguments": k["arguments"]}} for k in modern]
    if legacy:
        message["function_call"] = {"name": legacy[0]["name"], "arguments": legacy[0]["arguments"]}
    if outcome.kept:
        return None
    text = blocked_text(outcome.notes)
    prior = message.get("content")
    message["content"] = f"{prior}\n\n{text}" if isinstance(prior, str) and prior else text
    return "stop"


def repair_budget(decision: ResponseDecision) -> int:
    """How many repair calls the invalid parts of ``decision`` allow; 0 when none asks for a repair."""
    limits = [v.max_repairs for v in decision.calls if v.verdict == "invalid" and v.on_invalid == "repair"]
    o = decision.output
    if o is not None and o.verdict == "invalid" and o.on_invalid == "repair":
        limits.append(o.max_repairs)
    return max(limits, default=0)


def still_invalid(decision: ResponseDecision) -> bool:
    """Whether any tool call or the output of ``decision`` failed validation."""
    return any(v.verdict == "invalid" for v in decision.calls) or (
        decision.output is not None and decision.output.verdict == "invalid")


def message_of(choice: Any) -> dict[str, Any]:
    """The message of an upstream choice; a malformed one is the upstream's error, not ours."""
    message = choice.get("message") if isinstance(choice, dict) else None
    if message is None:
        return {}
    if not isinstance(message, dict):
        raise ProxyError("upstream_error", "upstream response has a malformed message")
    return message


def refuse_or_escalate(out: OutputVerdict | None) -> dict[str, Any] | None:
    """For a denied, invalid or escalated output: the escalation tool call that replaces it (decided by
    the core through every layer), else raise the refusal. None when the output stands."""
    if out is None or out.verdict not in ("deny", "invalid", "escalate"):
        return None
    if out.verdict == "deny":
        raise ProxyError("policy_denied", f"output blocked by rule {out.rule_id}: {out.reason}")
    if out.verdict == "escalate" and out.escalation is not None:
        call = out.escalation.call
        return {"id": call.id or "call_guardproxy_escalation", "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}
    raise ProxyError("schema_validation_failed", "model output failed schema validation: "
                     + "; ".join(out.errors[:10]), extra={"errors": list(out.errors[:50])})


def repair_body(body: dict[str, Any], message: dict[str, Any], decision: ResponseDecision) -> dict[str, Any]:
    """The original request plus the invalid answer and the validator's errors, to ask the model again."""
    messages = list(body.get("messages") or [])
    invalid_calls = [v for v in decision.calls if v.verdict == "invalid"]
    if invalid_calls and message.get("tool_calls"):
        messages.append({k: message[k] for k in ("role", "content", "tool_calls") if k in message})
        for v in decision.calls:
            if v.verdict == "invalid":
                text = ("guardproxy: these arguments were rejected, nothing was executed. Errors: "
                        + "; ".join(v.errors) + ". Call the tool again with arguments that match its schema.")
            else:
                text = "guardproxy: not executed because another call in this turn was invalid; repeat it if needed."
            messages.append({"role": "tool", "tool_call_id": v.call.id or "", "content": text})
    else:
        errors = list(decision.output.errors) if decision.output else []
        for v in invalid_calls:
            errors.extend(v.errors)
        if message.get("content"):
            messages.append({"role": "assistant", "content": message["content"]})
        messages.append({"role": "user", "content": "guardproxy: your previous answer was rejected by validation: "
                         + "; ".join(errors) + ". Answer again; it must satisfy the required JSON schema."})
    out = {**body, "messages": messages, "stream": False}
    out.pop("stream_options", None)  # OpenAI rejects stream_options on a non-streamed request
    return out


def message_text(message: dict[str, Any], eff: Effective) -> tuple[str | None, list[str]]:
    """(content as text, every other text field) of an assistant message, for output inspection; the other
    texts are only collected when a deny pattern will read them."""
    if eff.deny_patterns:
        return message_texts(message)
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return (content if isinstance(content, str) else None), []


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)
