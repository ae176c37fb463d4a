"""Stage 3b, the text side: deny patterns, output schemas and output rules on one assistant message.

Order: deny patterns on every text the message carries (any text, JSON or not) → schemas (every
applicable policy's ``output.schema`` plus the request's ``response_format`` schema) → output rules (on a
JSON object only). Rewrites layer like everything else: a narrower policy cannot change a field that a
broader policy's rewrite set (the org wins), and the rewritten output is checked once more against every
schema and deny pattern, so a rewrite can never emit what the policies forbid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from rules.celexpr import CelEvalError
from rules.decision import CallVerdict, OutputVerdict, Trail
from rules.effective import Effective, OutputRuleC, SchemaC
from rules.schemas import CompiledSchema
from rules.strictjson import StrictJSONError, loads_strict

# Builds (and decides) the escalation call that replaces an output, from a reason; None when unusable.
Escalate = Callable[[str], CallVerdict | None]


def violations(schemas: Sequence[CompiledSchema], value: Any) -> tuple[str, ...]:
    """Every violation of ``value`` against each schema, as ``"<pointer>: <message>"``."""
    errs: list[str] = []
    for s in schemas:
        errs.extend(f"{v.path or '/'}: {v.message}" for v in s.violations(value))
    return tuple(errs)


def shadow_schemas(trail: Trail, schemas: Sequence[SchemaC], value: Any, label: str) -> None:
    """Report what a shadow policy's schema would reject (``would_schema_invalid:<label>``), and the
    escalation its ``on_invalid: escalate`` would have made (``would_escalate:<label>``)."""
    for s in schemas:
        if s.shadow and not s.schema.is_valid(value):
            shadow_invalid(trail, s, label)


def shadow_invalid(trail: Trail, s: SchemaC, label: str) -> None:
    """Report one shadow schema failing, and the escalation it would have made."""
    trail.act(f"schema_invalid:{label}", f"{s.policy}:schema", None, shadow=True)
    if s.on_invalid == "escalate":
        trail.act(f"escalate:{label}", f"{s.policy}:schema", None, shadow=True)


def pattern_verdict(eff: Effective, texts: Sequence[str], trail: Trail, *,
                    action: str = "output_denied") -> OutputVerdict | None:
    """The first enforcing deny pattern any of ``texts`` matches (shadow matches are reported)."""
    for pat in eff.deny_patterns:
        if any(pat.regex.search(t) for t in texts):
            if pat.shadow:
                trail.act(action, pat.id, None, shadow=True)
                continue
            reason = pat.reason or f"output matches pattern {pat.id}"
            trail.act(action, pat.id, reason)
            return OutputVerdict("deny", rule_id=pat.id, reason=reason)
    return None


def _invalid(errors: tuple[str, ...], reason: str, on_invalid: str, max_repairs: int,
             escalate: Escalate) -> OutputVerdict:
    if on_invalid == "escalate":
        call = escalate("invalid output: " + "; ".join(errors))
        if call is not None:
            return OutputVerdict("escalate", rule_id="output:schema", reason=reason, errors=errors, escalation=call)
        on_invalid = "deny"  # no usable escalation tool: refused
    return OutputVerdict("invalid", rule_id="output:schema", reason=reason, errors=errors, on_invalid=on_invalid,
                         max_repairs=max_repairs)


def output_verdict(eff: Effective, content: str, *, model: str, principal: Mapping[str, str],
                   response_schema: CompiledSchema | None, max_depth: int, max_string: int, trail: Trail,
                   escalate: Escalate) -> OutputVerdict:
    """Decide the text of one message (deny patterns on it are checked by the caller first)."""
    pinned = [s for s in eff.output_schemas if not s.shadow]
    shadow_pinned = [s for s in eff.output_schemas if s.shadow]
    schemas = [s.schema for s in pinned]
    if response_schema is not None:
        schemas.append(response_schema)
    on_invalid, max_repairs = (pinned[0].on_invalid, pinned[0].max_repairs) if pinned else ("repair", 1)
    if not schemas and not eff.output_rules and not shadow_pinned:
        return OutputVerdict("allow")
    try:
        value = loads_strict(content, max_depth=max_depth, max_string=max_string)
    except StrictJSONError as exc:
        for shadow in shadow_pinned:
            shadow_invalid(trail, shadow, "output")
        if not schemas:
            return OutputVerdict("allow")  # free text: output rules only apply to structured outputs
        err = f"content: {exc}"
        trail.errors.append(err)
        return _invalid((err,), "output is not valid JSON", on_invalid, max_repairs, escalate)
    shadow_schemas(trail, shadow_pinned, value, "output")
    errors = violations(schemas, value)
    if errors:
        trail.errors.extend(errors)
        return _invalid(errors, "output does not match the schema", on_invalid, max_repairs, escalate)
    if not isinstance(value, dict):
        return OutputVerdict("allow")
    data = {"output": value, "args": {}, "tool": "", "model": model, "principal": principal}
    rewritten = _rules(eff.output_rules, value, data, trail)
    if isinstance(rewritten, OutputVerdict):
        return rewritten
    if rewritten is None:
        return OutputVerdict("allow")
    current, last = rewritten
    text = orjson.dumps(current).decode()
    # The rewritten output is what the agent gets: it must pass every schema and deny pattern too.
    errors = violations(schemas, current)
    if errors:
        trail.errors.extend(errors)
        trail.act("output_rewrite_invalid", last.id, "the rewritten output fails the output schema")
        return OutputVerdict("invalid", rule_id=last.id, reason="the rewritten output fails the output schema",
                             errors=errors, on_invalid="deny")
    denied = pattern_verdict(eff, (text,), trail)
    if denied is not None:
        return denied
    return OutputVerdict("rewrite", content=text, rule_id=last.id, reason=last.reason)


def _rules(rules: Sequence[OutputRuleC], value: dict[str, Any], data: dict[str, Any],
           trail: Trail) -> OutputVerdict | tuple[dict[str, Any], OutputRuleC] | None:
    """Run the output rules (ordered org → team → key): a deny verdict, the rewritten object and the last
    rewrite that changed it, or None. A field a broader policy's rewrite set keeps that value."""
    current = dict(value)
    owner: dict[str, int] = {}  # field -> level of the rewrite that set it
    last: OutputRuleC | None = None
    for rule in rules:
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
            reason = rule.reason or f"rule {rule.id} matched"
            trail.act("output_denied", rule.id, reason)
            return OutputVerdict("deny", rule_id=rule.id, reason=reason)
        applied = False
        for key, new in rule.set.items():
            if key in owner and owner[key] < rule.level:
                trail.errors.append(f"{rule.id}: {key} was set by a broader policy; kept")
                continue
            current[key] = new
            owner[key] = rule.level
            applied = True
        if applied:
            last = rule
            trail.act(f"output_rewritten:{rule.id}", rule.id, rule.reason or None)
    return (current, last) if last is not None else None
