"""Stage 3b: the response side. ``evaluate_response(effective, calls, content, ctx, now=...)``.

Every tool call is checked by exact name (allowlists of every matching policy),
then its arguments are parsed strictly, validated against the pinned schema
(or, failing that, the schema the request declared) and run through the tool's
CEL rules. Precedence when several rules match: deny > require_approval >
escalate > allow. A rule that errors at run time counts as matching unless it
says ``on_error: skip``. The content of a structured output is parsed, checked
against schemas, rules and RE2 deny patterns.

State (approvals, once-per-conversation) is not read here: verdicts carry the
argument hash and the shell consults the store afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from rules.canonical import call_key
from rules.celexpr import CelEvalError
from rules.decision import CallVerdict, Effect, ResponseDecision, ToolCallIn, Trail
from rules.effective import Effective, SchemaC, ToolRuleC
from rules.evaluate import Principal, printable_name, valid_tool_name
from rules.evaluate_output import Escalate, output_verdict, pattern_verdict, shadow_schemas, violations
from rules.schemas import CompiledSchema
from rules.strictjson import StrictJSONError, loads_strict

_RANK = {"allow": 0, "escalate": 1, "require_approval": 2, "deny": 3}


@dataclass(frozen=True)
class ResponseContext:
    """What the response side needs besides the model's output."""

    principal: Principal
    model: str
    declared_schemas: Mapping[str, CompiledSchema] = field(default_factory=dict)
    response_schema: CompiledSchema | None = None
    max_depth: int = 32
    max_string: int = 65536


def _data(ctx: ResponseContext, tool: str, args: Any) -> dict[str, Any]:
    return {"args": args if isinstance(args, dict) else {}, "tool": tool, "model": ctx.model,
            "principal": ctx.principal.as_cel(), "output": {}}


def _strings(value: Any) -> list[str]:
    """Every string (keys included) in a parsed argument value, for the deny patterns."""
    out: list[str] = []
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, dict):
            out.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return out


def _pattern_denial(eff: Effective, call: ToolCallIn, args: Any, trail: Trail) -> CallVerdict | None:
    """Deny patterns apply to what a call would carry out of the model too: its raw arguments and every
    decoded string in them (escapes cannot hide a match)."""
    if not eff.deny_patterns:
        return None
    texts = [call.arguments, *_strings(args)] if args is not None else [call.arguments]
    hit = pattern_verdict(eff, texts, trail, action=f"tool_denied:{call.name}")
    if hit is None:
        return None
    return CallVerdict(call, "deny", hit.rule_id, hit.reason, args=args)


def _escalation(eff: Effective, call: ToolCallIn, payload: dict[str, Any], ctx: ResponseContext, trail: Trail,
                depth: int) -> CallVerdict | None:
    """The escalation call that replaces ``call``, decided like any other call through every layer
    (gates, schemas, rules, approvals). None when no escalation tool is usable or that call is refused;
    an escalation call is never escalated again."""
    target = eff.escalate_to
    if depth > 0 or target is None or not valid_tool_name(target) or eff.tool_blocked(target)[0] is not None:
        return None
    arguments = orjson.dumps(payload).decode()
    then = _call_verdict(eff, ToolCallIn(call.index, call.id, target, arguments, call.legacy), ctx, trail, depth + 1)
    if then.verdict not in ("allow", "hold"):
        trail.errors.append(f"{call.name}: escalation call {target} refused ({then.rule_id}: {then.reason})")
        return None
    return then


def _escalate(eff: Effective, call: ToolCallIn, args: Any, rule_id: str, reason: str, ctx: ResponseContext,
              trail: Trail, depth: int, *, errors: tuple[str, ...] = (), digest: str | None = None) -> CallVerdict:
    payload = {"reason": reason, "original_tool": call.name, "original_arguments": args}
    then = _escalation(eff, call, payload, ctx, trail, depth)
    if then is None:
        trail.act(f"tool_denied:{call.name}", rule_id, reason + " (no escalation tool allowed)")
        return CallVerdict(call, "deny", rule_id, reason, args=args, args_hash=digest, errors=errors)
    trail.act(f"escalated:{call.name}", rule_id, reason)
    return CallVerdict(call, "escalate", rule_id, reason, args=args, args_hash=digest, errors=errors,
                       new_name=then.call.name, new_arguments=then.call.arguments, then=then)


def _invalid(eff: Effective, call: ToolCallIn, args: Any, rule_id: str, reason: str, errors: tuple[str, ...],
             on_invalid: str, max_repairs: int, ctx: ResponseContext, trail: Trail, depth: int,
             digest: str | None = None) -> CallVerdict:
    trail.errors.extend(f"{call.name}: {e}" for e in errors)
    if on_invalid == "escalate":
        return _escalate(eff, call, call.arguments, rule_id, "invalid arguments: " + "; ".join(errors), ctx,
                         trail, depth, errors=errors, digest=digest)
    return CallVerdict(call, "invalid", rule_id, reason, args=args, args_hash=digest, errors=errors,
                       on_invalid=on_invalid, max_repairs=max_repairs)


def _call_verdict(eff: Effective, call: ToolCallIn, ctx: ResponseContext, trail: Trail,
                  depth: int = 0) -> CallVerdict:
    name = call.name
    if not valid_tool_name(name):
        shown = printable_name(name)
        trail.act(f"tool_denied:{shown}", "tools.invalid_name", f"tool name {shown!r} is not valid")
        return CallVerdict(call, "deny", "tools.invalid_name", "invalid tool name")
    enforced, shadow = eff.tool_blocked(name)
    if enforced is not None:
        gate_rule = f"{enforced.policy}:tools"
        gate_reason = f"tool {name} is not allowed by policy {enforced.policy}"
        trail.act(f"tool_denied:{name}", gate_rule, gate_reason)
        return CallVerdict(call, "deny", gate_rule, gate_reason)
    if shadow is not None:
        trail.act(f"tool_denied:{name}", f"{shadow.policy}:tools", None, shadow=True)
    all_pinned: tuple[SchemaC, ...] = eff.tool_schemas.get(name, ())
    pinned = tuple(s for s in all_pinned if not s.shadow)
    on_invalid, max_repairs = (pinned[0].on_invalid, pinned[0].max_repairs) if pinned else ("repair", 1)
    try:
        args = loads_strict(call.arguments or "{}", max_depth=ctx.max_depth, max_string=ctx.max_string)
    except StrictJSONError as exc:
        denied = _pattern_denial(eff, call, None, trail)
        if denied is not None:
            return denied
        err = f"arguments: {exc}"
        return _invalid(eff, call, None, f"{name}:arguments", err, (err,), on_invalid if pinned else "deny",
                        max_repairs, ctx, trail, depth)
    denied = _pattern_denial(eff, call, args, trail)
    if denied is not None:
        return denied
    if not isinstance(args, dict):
        return _invalid(eff, call, args, f"{name}:arguments", "arguments must be a JSON object",
                        ("arguments must be a JSON object",), "deny", 0, ctx, trail, depth)
    shadow_schemas(trail, all_pinned, args, name)
    schemas = [s.schema for s in pinned]
    if not schemas and name in ctx.declared_schemas:
        schemas = [ctx.declared_schemas[name]]
    errors = violations(schemas, args)
    digest = call_key(name, args, call.arguments or "{}")
    if errors:
        return _invalid(eff, call, args, f"{name}:schema", "arguments do not match the schema", errors, on_invalid,
                        max_repairs, ctx, trail, depth, digest)
    best = "allow"
    best_rule: ToolRuleC | None = None
    data = _data(ctx, name, args)
    for rule in eff.tool_rules.get(name, ()):
        try:
            hit = rule.condition.holds(data)
        except CelEvalError as exc:
            trail.errors.append(f"{rule.id}: {exc}")
            hit = rule.on_error == "match" and rule.action != "allow"
        if not hit:
            continue
        if rule.shadow:
            trail.act(f"{rule.action}:{name}", rule.id, None, shadow=True)
            continue
        if _RANK[rule.action] > _RANK[best]:
            if best_rule is not None and best_rule.id not in trail.rule_ids:
                trail.rule_ids.append(best_rule.id)  # outranked, but it matched too
            best, best_rule = rule.action, rule
        elif rule.id not in trail.rule_ids:
            trail.rule_ids.append(rule.id)
    once = name in eff.once_tools
    shadow_once = name in eff.shadow_once_tools
    if best_rule is None:
        return CallVerdict(call, "allow", args=args, args_hash=digest, once=once, shadow_once=shadow_once)
    reason = best_rule.reason or f"rule {best_rule.id} matched"
    if best == "deny":
        trail.act(f"tool_denied:{name}", best_rule.id, reason)
        return CallVerdict(call, "deny", best_rule.id, reason, args=args, args_hash=digest)
    if best == "require_approval":
        trail.act(f"held:{name}", best_rule.id, reason)
        return CallVerdict(call, "hold", best_rule.id, reason, args=args, args_hash=digest, once=once,
                           shadow_once=shadow_once)
    return _escalate(eff, call, args, best_rule.id, reason, ctx, trail, depth, digest=digest)


def _output_escalation(eff: Effective, ctx: ResponseContext, trail: Trail) -> Escalate:
    def escalate(reason: str) -> CallVerdict | None:
        call = ToolCallIn(0, "call_guardproxy_escalation", "", "")
        payload = {"reason": reason, "original_tool": None, "original_arguments": None}
        then = _escalation(eff, call, payload, ctx, trail, 0)
        return then if then is not None and then.verdict == "allow" else None  # nothing to hold it in
    return escalate


def evaluate_response(
    eff: Effective,
    calls: Sequence[ToolCallIn],
    content: str | None,
    ctx: ResponseContext,
    *,
    now: float,
    other_text: Sequence[str] = (),
) -> ResponseDecision:
    """Decide every tool call and the content of one assistant message.

    ``other_text`` is every other text the message carries (``refusal``, reasoning, transcripts, text in
    other content parts): deny patterns apply to it too, so output inspection cannot be sidestepped
    through another field. Deny patterns also apply to each call's arguments (the call is removed).
    """
    del now  # response rules are time-independent today; the clock stays in the signature
    trail = Trail()
    verdicts = tuple(_call_verdict(eff, c, ctx, trail) for c in calls)
    output = None
    texts = [t for t in (content, *other_text) if t]
    if texts and eff.deny_patterns:
        output = pattern_verdict(eff, texts, trail)
    if output is None and content and (eff.inspects_output or ctx.response_schema is not None):
        output = output_verdict(eff, content, model=ctx.model, principal=ctx.principal.as_cel(),
                                response_schema=ctx.response_schema, max_depth=ctx.max_depth,
                                max_string=ctx.max_string, trail=trail,
                                escalate=_output_escalation(eff, ctx, trail))
    denied = output is not None and output.verdict == "deny"
    changed = any(v.verdict != "allow" for v in verdicts) or (output is not None and output.verdict != "allow")
    removed_all = bool(verdicts) and all(v.verdict in ("deny", "invalid", "hold") for v in verdicts)
    effect: Effect = "deny" if denied or removed_all else ("modify" if changed else "allow")
    return ResponseDecision(
        effect=effect, revision=eff.revision, rule_ids=tuple(trail.rule_ids), reasons=tuple(trail.reasons),
        actions=tuple(trail.actions), would=tuple(trail.would), errors=tuple(trail.errors), calls=verdicts,
        output=output,
    )
