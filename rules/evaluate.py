"""Stage 3a: the request side. ``evaluate_request(effective, body, principal, now=...)``.

Refuses a disallowed model or a forced disallowed tool (every forcing field is
checked: ``tool_choice`` in each of its shapes and the legacy ``function_call``);
strips disallowed tools from ``tools`` / ``functions`` before the model sees
them; clamps numeric parameters once into the interval every enforcing limit
leaves (the highest ``min``, the lowest ``max``). Pure: the body is never
mutated in place (copy on first change), and an unchanged body is returned as
the same object so the shell can forward the original bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from rules.decision import Refusal, RequestDecision, Trail
from rules.effective import DEFAULT_ORG, TOKEN_PARAMS, Effective, ParamC

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Principal:
    """Who is calling, as resolved from the proxy key (never from the request)."""

    key_id: str
    team: str | None = None
    org: str = DEFAULT_ORG

    def as_cel(self) -> dict[str, str]:
        """The ``principal`` variable of CEL conditions."""
        return {"key": self.key_id, "team": self.team or "", "org": self.org}


def valid_tool_name(name: Any) -> bool:
    """Exactly the names an OpenAI-compatible API forwards; anything else is denied."""
    return isinstance(name, str) and TOOL_NAME.fullmatch(name) is not None


class _Req:
    def __init__(self, eff: Effective, body: dict[str, Any]) -> None:
        self.eff = eff
        self.orig = body
        self.body = body
        self.trail = Trail()

    def writable(self) -> dict[str, Any]:
        if self.body is self.orig:
            self.body = dict(self.orig)
        return self.body

    def tool_denied(self, name: Any) -> tuple[str | None, str | None]:
        """(rule id of an enforcing block, rule id of a shadow-only block); at most one is set."""
        if not valid_tool_name(name):
            return "tools.invalid_name", None
        enforced, shadow = self.eff.tool_blocked(name)
        if enforced is not None:
            return f"{enforced.policy}:tools", None
        return None, (f"{shadow.policy}:tools" if shadow is not None else None)


def _refuse(req: _Req, code: str, message: str, rule_id: str, param: str | None) -> RequestDecision:
    t = req.trail
    t.act(f"refused:{code}", rule_id, message)
    return RequestDecision(
        effect="deny", revision=req.eff.revision, rule_ids=tuple(t.rule_ids), reasons=tuple(t.reasons),
        actions=tuple(t.actions), would=tuple(t.would), refusal=Refusal(code, message, rule_id, param),
    )


def _check_model(req: _Req, model: str) -> RequestDecision | None:
    for policy, shadow, allowed in req.eff.model_gates:
        if model in allowed:
            continue
        if shadow:
            req.trail.act(f"deny_model:{model}", f"{policy}:models.allow", None, shadow=True)
            continue
        return _refuse(req, "model_not_allowed",
                       f"model {model!r} is not allowed by policy {policy}", f"{policy}:models.allow", "model")
    return None


def _named(entry: Any, kind: str) -> Any:
    """The name in ``{type: kind, kind: {name}}`` (``None`` for any other shape: an invalid name)."""
    inner = entry.get(kind) if isinstance(entry, dict) else None
    return inner.get("name") if isinstance(inner, dict) else None


def _choice_names(choice: dict[str, Any]) -> list[Any]:
    kind = choice.get("type")
    if kind == "allowed_tools":
        spec = choice.get("allowed_tools")
        tools = spec.get("tools") if isinstance(spec, dict) else None
        if not isinstance(tools, list):
            return [None]
        return [_named(t, "custom" if isinstance(t, dict) and t.get("type") == "custom" else "function")
                for t in tools]
    return [_named(choice, "custom" if kind == "custom" else "function")]


def _forced_tools(body: dict[str, Any]) -> list[tuple[Any, str]]:
    """Every (tool name, field) the body forces or restricts the model to; each field independently."""
    forced: list[tuple[Any, str]] = []
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        forced.extend((name, "tool_choice") for name in _choice_names(choice))
    fc = body.get("function_call")
    if isinstance(fc, dict):
        forced.append((fc.get("name"), "function_call"))
    return forced


def _strip_tools(req: _Req) -> None:
    body = req.body
    for field, get_name in (("tools", _tool_name), ("functions", _function_name)):
        items = body.get(field)
        if not isinstance(items, list):
            continue
        kept = []
        for item in items:
            name = get_name(item)
            rule, shadow_block = req.tool_denied(name)
            if rule is not None:
                shown = printable_name(name)
                req.trail.act(f"tool_stripped:{shown}", rule, f"tool {shown} is not allowed")
                continue
            if shadow_block is not None:
                req.trail.act(f"tool_stripped:{name}", shadow_block, None, shadow=True)
            kept.append(item)
        if len(kept) == len(items):
            continue
        out = req.writable()
        if kept:
            out[field] = kept
        else:
            # An empty tools list (or a choice without tools) is invalid upstream: drop them together.
            out.pop(field, None)
            if field == "tools":
                out.pop("tool_choice", None)
                out.pop("parallel_tool_calls", None)
            else:
                out.pop("function_call", None)


def _tool_name(item: Any) -> Any:
    fn = item.get("function") if isinstance(item, dict) else None
    return fn.get("name") if isinstance(fn, dict) else None


def _function_name(item: Any) -> Any:
    return item.get("name") if isinstance(item, dict) else None


def printable_name(name: Any) -> str:
    """A printable, bounded form of a (possibly hostile) tool name for messages and headers."""
    if not isinstance(name, str):
        return "<invalid>"
    if TOOL_NAME.fullmatch(name):  # the common case: already printable ASCII without ", "
        return name
    safe = "".join(ch if ch.isascii() and ch.isprintable() and ch not in ", " else "?" for ch in name[:64])
    return safe or "<empty>"


def _rule(lim: ParamC) -> str:
    return f"{lim.policy}:models.params.{lim.name}"


def _moves(lim: ParamC, value: Any, tokens: bool) -> bool:
    """Whether ``lim`` alone would change ``value`` (an absent token limit is set from a ``max``)."""
    if value is None:
        return tokens and lim.max is not None
    return (lim.max is not None and value > lim.max) or (lim.min is not None and value < lim.min)


def _into(value: Any, low: ParamC | None, high: ParamC | None, tokens: bool) -> tuple[Any, ParamC | None]:
    """``value`` clamped once into ``[low.min, high.max]``, and the limit that moved it.

    The max is applied last, so even limits that contradict each other (the load refuses them) never
    let a value above a broader policy's max through. Token counts are integers upstream: rounded
    towards the limit that moved the value.
    """
    new, moved_by = value, None
    if low is not None and low.min is not None and value is not None and value < low.min:
        new, moved_by = (math.ceil(low.min) if tokens else low.min), low
    if high is not None and high.max is not None and (new > high.max if new is not None else tokens):
        new, moved_by = (math.floor(high.max) if tokens else high.max), high
    return new, (moved_by if new != value else None)


def _clamp(req: _Req) -> None:
    # Limits are combined before clamping: applying them one after the other let a narrower policy's
    # ``min`` undo a broader one's ``max``. The load refuses policies whose interval is empty.
    for group, limits in req.eff.params.items():
        tokens = group == TOKEN_PARAMS[0]
        enforced = [lim for lim in limits if not lim.shadow]
        low = max((lim for lim in enforced if lim.min is not None), key=lambda lim: lim.min or 0.0, default=None)
        high = min((lim for lim in enforced if lim.max is not None), key=lambda lim: lim.max or 0.0, default=None)
        present = [n for n in (TOKEN_PARAMS if tokens else (group,)) if n in req.body]
        if not present and tokens:
            # Absent token limits are set (under the name of the limit that sets them): otherwise the
            # model's default bound applies.
            setter = high or next((lim for lim in limits if lim.max is not None), None)
            present = [setter.name] if setter is not None else []
        for target in present:
            value = req.body.get(target)
            if value is None and not tokens:
                continue
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                continue  # wrong types are the shell's validation error, not a clamp
            new, moved_by = _into(value, low, high, tokens)
            if moved_by is not None:
                if not tokens and isinstance(value, int) and float(new).is_integer():
                    new = int(new)  # keep ``2`` an int, but never truncate ``0.3`` to ``0``
                req.writable()[target] = new
                req.trail.act(f"clamped:{target}", _rule(moved_by), None)
            # A shadow limit reports what combining it would change, given the enforced result.
            shadow = [_rule(lim) for lim in limits if lim.shadow and _moves(lim, new, tokens)]
            if shadow:
                req.trail.would.append(f"would_clamped:{target}")
                req.trail.rule_ids.extend(r for r in dict.fromkeys(shadow) if r not in req.trail.rule_ids)


def evaluate_request(eff: Effective, body: dict[str, Any], principal: Principal, *, now: float) -> RequestDecision:
    """Decide the request side. ``now`` is the caller's clock (unused by request rules today)."""
    del principal, now  # request rules depend on the principal only through ``eff``
    req = _Req(eff, body)
    model = body.get("model")
    refused = _check_model(req, str(model))
    if refused is not None:
        return refused
    for forced, param in _forced_tools(body):
        rule, shadow_block = req.tool_denied(forced)
        if rule is not None:
            return _refuse(req, "tool_not_allowed",
                           f"{param} forces tool {printable_name(forced)!r}, which policy does not allow", rule, param)
        if shadow_block is not None:
            req.trail.act(f"deny_forced_tool:{forced}", shadow_block, None, shadow=True)
    _strip_tools(req)
    if body.get("tool_choice") == "required" and "tools" in body and "tools" not in req.body:
        return _refuse(req, "tool_not_allowed", "tool_choice is 'required' but policy allows none of the tools",
                       "tools.required", "tool_choice")
    _clamp(req)
    t = req.trail
    changed = req.body is not req.orig
    return RequestDecision(
        effect="modify" if changed else "allow", revision=eff.revision, rule_ids=tuple(t.rule_ids),
        reasons=tuple(t.reasons), actions=tuple(t.actions), would=tuple(t.would), body=req.body,
        changed=changed,
    )
