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
from rules.decision import CallVerdict, Effect, OutputVerdict, ResponseDecision, ToolCallIn, Trail
from rules.effective import Effective, SchemaC, ToolRuleC
from rules.evaluate import Principal, printable_name, valid_tool_name
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


def _violations(schemas: Sequence[CompiledSchema], value: Any) -> tuple[str, ...]:
    errs: list[str] = []
    for s in schemas:
        errs.extend(f"{v.path or '/'}: {v.message}" for v in s.violations(value))
    return tuple(errs)


def _shadow_schemas(trail: Trail, schemas: Sequence[SchemaC], value: Any, label: str) -> None:
    """Report (as ``would_schema_invalid:<label>``) what a shadow policy's schema would reject."""
    for s in schemas:
        if s.shadow and not s.schema.is_valid(value):
            trail.act(f"schema_invalid:{label}", f"{s.policy}:schema", None, shadow=True)


def _escalation(eff: Effective, call: ToolCallIn, args: Any, reason: str) -> tuple[str, str] | None:
    target = eff.escalate_to
    if target is None or not valid_tool_name(target) or eff.tool_blocked(target)[0] is not None:
        return None
    payload = {"reason": reason, "original_tool": call.name, "original_arguments": args}
    return target, orjson.dumps(payload).decode()


def _call_verdict(eff: Effective, call: ToolCallIn, ctx: ResponseContext, trail: Trail) -> CallVerdict:
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
        err = f"arguments: {exc}"
        trail.errors.append(f"{name}: {err}")
        return CallVerdict(call, "invalid", f"{name}:arguments", err, errors=(err,),
                           on_invalid=on_invalid if pinned else "deny", max_repairs=max_repairs)
    if not isinstance(args, dict):
        err = "arguments must be a JSON object"
        trail.errors.append(f"{name}: {err}")
        return CallVerdict(call, "invalid", f"{name}:arguments", err, errors=(err,), on_invalid="deny")
    _shadow_schemas(trail, all_pinned, args, name)
    schemas = [s.schema for s in pinned]
    if not schemas and name in ctx.declared_schemas:
        schemas = [ctx.declared_schemas[name]]
    errors = _violations(schemas, args)
    digest = call_key(name, args, call.arguments or "{}")
    if errors:
        trail.errors.extend(f"{name}: {e}" for e in errors)
        return CallVerdict(call, "invalid", f"{name}:schema", "arguments do not match the schema", args=args,
                           args_hash=digest, errors=errors, on_invalid=on_invalid, max_repairs=max_repairs)
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
    if best_rule is None:
        return CallVerdict(call, "allow", args=args, args_hash=digest, once=once)
    reason = best_rule.reason or f"rule {best_rule.id} matched"
    if best == "deny":
        trail.act(f"tool_denied:{name}", best_rule.id, reason)
        return CallVerdict(call, "deny", best_rule.id, reason, args=args, args_hash=digest)
    if best == "require_approval":
        trail.act(f"held:{name}", best_rule.id, reason)
        return CallVerdict(call, "hold", best_rule.id, reason, args=args, args_hash=digest, once=once)
    rewritten = _escalation(eff, call, args, reason)
    if rewritten is None:
        trail.act(f"tool_denied:{name}", best_rule.id, reason + " (no escalation tool allowed)")
        return CallVerdict(call, "deny", best_rule.id, reason, args=args, args_hash=digest)
    trail.act(f"escalated:{name}", best_rule.id, reason)
    return CallVerdict(call, "escalate", best_rule.id, reason, args=args, args_hash=digest,
                       new_name=rewritten[0], new_arguments=rewritten[1])


def escalate_invalid(eff: Effective, call: ToolCallIn, errors: Sequence[str]) -> CallVerdict | None:
    """Rewrite an invalid call into the escalation tool (``on_invalid: escalate``), if one is allowed."""
    reason = "invalid arguments: " + "; ".join(errors)
    rewritten = _escalation(eff, call, call.arguments, reason)
    if rewritten is None:
        return None
    return CallVerdict(call, "escalate", f"{call.name}:schema", reason, new_name=rewritten[0],
                       new_arguments=rewritten[1], errors=tuple(errors))


def _pattern_verdict(eff: Effective, texts: Sequence[str], trail: Trail) -> OutputVerdict | None:
    for pat in eff.deny_patterns:
        if any(pat.regex.search(t) for t in texts):
            if pat.shadow:
                trail.act("output_denied", pat.id, None, shadow=True)
                continue
            reason = pat.reason or f"output matches pattern {pat.id}"
            trail.act("output_denied", pat.id, reason)
            return OutputVerdict("deny", rule_id=pat.id, reason=reason)
    return None


def _output_verdict(eff: Effective, content: str, ctx: ResponseContext, trail: Trail) -> OutputVerdict:
    denied = _pattern_verdict(eff, (content,), trail)
    if denied is not None:
        return denied
    pinned = [s for s in eff.output_schemas if not s.shadow]
    shadow_pinned = [s for s in eff.output_schemas if s.shadow]
    schemas = [s.schema for s in pinned]
    if ctx.response_schema is not None:
        schemas.append(ctx.response_schema)
    on_invalid, max_repairs = (pinned[0].on_invalid, pinned[0].max_repairs) if pinned else ("repair", 1)
    if not schemas and not eff.output_rules and not shadow_pinned:
        return OutputVerdict("allow")
    try:
        value = loads_strict(content, max_depth=ctx.max_depth, max_string=ctx.max_string)
    except StrictJSONError as exc:
        if shadow_pinned:
            trail.act("schema_invalid:output", f"{shadow_pinned[0].policy}:schema", None, shadow=True)
        if not schemas:
            return OutputVerdict("allow")  # free text: output rules only apply to structured outputs
        err = f"content: {exc}"
        trail.errors.append(err)
        return OutputVerdict("invalid", rule_id="output:schema", reason="output is not valid JSON",
                             errors=(err,), on_invalid=on_invalid, max_repairs=max_repairs)
    _shadow_schemas(trail, shadow_pinned, value, "output")
    errors = _violations(schemas, value)
    if errors:
        trail.errors.extend(errors)
        return OutputVerdict("invalid", rule_id="output:schema", reason="output does not match the schema",
                             errors=errors, on_invalid=on_invalid, max_repairs=max_repairs)
    if not isinstance(value, dict):
        return OutputVerdict("allow")
    data = {"output": value, "args": {}, "tool": "", "model": ctx.model, "principal": ctx.principal.as_cel()}
    current, rule_hit = value, None
    for rule in eff.output_rules:
        try:
            hit = rule.condition.holds(data)
        except CelEvalError as exc:
            trail.errors.append(f"{rule.id}: {exc}")
            hit = rule.on_error == "match" and rule.action == "deny"
        if not hit:
            continue
        if rule.shadow:
            trail.act(f"output_{rule.action}", rule.id, None, shadow=True)
            continue
        if rule.action == "deny":
            trail.act("output_denied", rule.id, rule.reason or f"rule {rule.id} matched")
            return OutputVerdict("deny", rule_id=rule.id, reason=rule.reason or f"rule {rule.id} matched")
        current = {**current, **rule.set}
        rule_hit = rule
        trail.act(f"output_rewritten:{rule.id}", rule.id, rule.reason or None)
    if rule_hit is None:
        return OutputVerdict("allow")
    return OutputVerdict("rewrite", content=orjson.dumps(current).decode(), rule_id=rule_hit.id,
                         reason=rule_hit.reason)


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

    ``other_text`` is any other text the message carries (``refusal``, reasoning): deny patterns apply
    to it too, so output inspection cannot be sidestepped through another field.
    """
    del now  # response rules are time-independent today; the clock stays in the signature
    trail = Trail()
    verdicts = tuple(_call_verdict(eff, c, ctx, trail) for c in calls)
    output = None
    if other_text:
        output = _pattern_verdict(eff, other_text, trail)
    if output is None and content and (eff.inspects_output or ctx.response_schema is not None):
        output = _output_verdict(eff, content, ctx, trail)
    denied = output is not None and output.verdict == "deny"
    changed = any(v.verdict != "allow" for v in verdicts) or (output is not None and output.verdict != "allow")
    removed_all = bool(verdicts) and all(v.verdict in ("deny", "invalid", "hold") for v in verdicts)
    effect: Effect = "deny" if denied or removed_all else ("modify" if changed else "allow")
    return ResponseDecision(
        effect=effect, revision=eff.revision, rule_ids=tuple(trail.rule_ids), reasons=tuple(trail.reasons),
        actions=tuple(trail.actions), would=tuple(trail.would), errors=tuple(trail.errors), calls=verdicts,
        output=output,
    )
