"""Compiled pieces, and their restrictive combination for one principal.

Layering rule: every matching policy applies. Any deny wins, allowlists
intersect, numeric limits combine into one interval (the highest ``min``, the
lowest ``max``), cost ceilings all apply. Each constraint keeps the mode of the
policy (or rule) it came from, so shadow findings are reported as ``would_*``
while enforced ones act.

Team identity is ``(org, team)``: a ``match.teams`` entry ``support`` is team
``support`` of org ``default``, ``acme/support`` is team ``support`` of org
``acme`` (see :func:`team_ref`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rules.celexpr import Condition
from rules.cost import EffectiveCost, combine
from rules.model import Policy
from rules.schemas import CompiledSchema

DEFAULT_ORG = "default"
# One limit under two names: a bound on either applies to whichever the request uses.
TOKEN_PARAMS = ("max_tokens", "max_completion_tokens")


def limit_group(param: str) -> str:
    """The limit a ``models.params`` name belongs to (both token names are ``max_tokens``)."""
    return TOKEN_PARAMS[0] if param in TOKEN_PARAMS else param


def team_ref(entry: str) -> tuple[str, str]:
    """A ``match.teams`` entry as ``(org, team)``: ``team`` is in org ``default``; ``org/team`` splits on
    the first ``/``."""
    org, sep, team = entry.partition("/")
    return (org, team) if sep else (DEFAULT_ORG, entry)


@dataclass(frozen=True)
class Gate:
    """One policy's tool allowlist/denylist.

    Deny entries match whatever the case (``Delete_account`` is under ``delete_*``): a denied tool must not
    come back through a case variant an upstream may resolve to it. Allow entries stay exact: ``Apply_Credit``
    is not the allowed ``apply_credit``.
    """

    policy: str
    shadow: bool
    default_deny: bool
    allowed: frozenset[str]
    deny_re: Any  # compiled case-insensitive RE2 pattern of the wildcard globs, or None
    deny_names: frozenset[str] = frozenset()  # the deny entries without wildcards, case-folded

    def blocks(self, tool: str) -> bool:
        """Whether this gate keeps ``tool`` out."""
        if tool.casefold() in self.deny_names:
            return True
        if self.deny_re is not None and self.deny_re.search(tool):
            return True
        return self.default_deny and tool not in self.allowed


@dataclass(frozen=True)
class ToolRuleC:
    id: str
    condition: Condition
    action: str
    reason: str
    shadow: bool
    on_error: str
    policy: str
    level: int = 0  # the policy's level: 0 org, 1 team, 2 key


@dataclass(frozen=True)
class OutputRuleC:
    id: str
    condition: Condition
    action: str
    set: dict[str, Any]
    reason: str
    shadow: bool
    on_error: str
    policy: str
    level: int = 0  # the policy's level: a narrower rewrite cannot override a field a broader one sets


@dataclass(frozen=True)
class PatternC:
    id: str
    regex: Any
    reason: str
    shadow: bool
    policy: str
    level: int = 0


@dataclass(frozen=True)
class SchemaC:
    schema: CompiledSchema
    on_invalid: str
    max_repairs: int
    policy: str
    shadow: bool = False  # a shadow policy's schema is checked and reported as ``would_*``, never enforced
    level: int = 0


@dataclass(frozen=True)
class ParamC:
    min: float | None
    max: float | None
    policy: str
    shadow: bool
    name: str = ""  # the parameter as the policy names it (``max_completion_tokens`` in the tokens limit)


@dataclass(frozen=True)
class CompiledPolicy:
    """One policy with its conditions, validators and patterns compiled."""

    policy: Policy
    source: str
    shadow: bool
    gate: Gate
    tool_rules: dict[str, tuple[ToolRuleC, ...]]
    tool_schemas: dict[str, SchemaC]
    output_rules: tuple[OutputRuleC, ...]
    output_schema: SchemaC | None
    deny_patterns: tuple[PatternC, ...]
    teams: frozenset[tuple[str, str]]  # ``match.teams`` as (org, team), see :func:`team_ref`

    @property
    def name(self) -> str:
        return self.policy.metadata.name

    def matches(self, key_id: str, team: str | None, org: str = DEFAULT_ORG) -> bool:
        """Whether this policy applies to the principal; teams are told apart by their org."""
        m = self.policy.match
        return m.all or key_id in m.keys or (team is not None and (org, team) in self.teams)


@dataclass(frozen=True)
class Effective:
    """Everything that applies to one principal, combined restrictively."""

    revision: str
    policy_names: tuple[str, ...]
    model_gates: tuple[tuple[str, bool, frozenset[str]], ...]
    params: dict[str, tuple[ParamC, ...]]
    gates: tuple[Gate, ...]
    tool_rules: dict[str, tuple[ToolRuleC, ...]]
    tool_schemas: dict[str, tuple[SchemaC, ...]]
    once_tools: frozenset[str]
    escalate_to: str | None
    output_rules: tuple[OutputRuleC, ...]
    output_schemas: tuple[SchemaC, ...]
    deny_patterns: tuple[PatternC, ...]
    cost: EffectiveCost | None
    fail_open: bool
    # What shadow policies would add if they were enforced, reported as ``would_*`` findings only:
    # their once-per-conversation tools, and the cost limits of enforcing and shadow policies combined.
    shadow_once_tools: frozenset[str] = frozenset()
    shadow_cost: EffectiveCost | None = None
    # Memo of tool_blocked: the RE2 wrapper costs ~15 µs a call and the same few names come back on
    # every request. Names reaching it are valid (<= 64 chars); the bound keeps hostile churn finite.
    _blocked: dict[str, tuple[Gate | None, Gate | None]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def inspects_output(self) -> bool:
        """Whether assistant text must be buffered to be checked (rules, schema or patterns)."""
        return bool(self.output_rules or self.output_schemas or self.deny_patterns)

    def tool_blocked(self, tool: str) -> tuple[Gate | None, Gate | None]:
        """The first enforcing gate and the first shadow gate that block ``tool``."""
        hit = self._blocked.get(tool)
        if hit is not None:
            return hit
        enforced = shadow = None
        for g in self.gates:
            if g.blocks(tool):
                if g.shadow:
                    shadow = shadow or g
                else:
                    enforced = enforced or g
        if len(self._blocked) < 4096:
            self._blocked[tool] = (enforced, shadow)
        return enforced, shadow


def build_effective(matched: Sequence[CompiledPolicy], revision: str) -> Effective:
    """Combine the policies matching one principal (ordered org, team, key)."""
    model_gates = tuple(
        (cp.name, cp.shadow, frozenset(cp.policy.models.allow))
        for cp in matched
        if cp.policy.models.allow is not None
    )
    params: dict[str, list[ParamC]] = {}
    tool_rules: dict[str, list[ToolRuleC]] = {}
    tool_schemas: dict[str, list[SchemaC]] = {}
    once: set[str] = set()
    shadow_once: set[str] = set()
    escalate_to = None
    output_rules: list[OutputRuleC] = []
    output_schemas: list[SchemaC] = []
    patterns: list[PatternC] = []
    fail_open = bool(matched)
    for cp in matched:
        p = cp.policy
        for pname, lim in p.models.params.items():
            params.setdefault(limit_group(pname), []).append(ParamC(lim.min, lim.max, cp.name, cp.shadow, pname))
        for tool, rules in cp.tool_rules.items():
            tool_rules.setdefault(tool, []).extend(rules)
        for tool, sc in cp.tool_schemas.items():
            tool_schemas.setdefault(tool, []).append(sc)
        (shadow_once if cp.shadow else once).update(
            t for t, spec in p.tools.allow.items() if spec.once_per_conversation)
        if not cp.shadow:
            if p.tools.escalate_to is not None:
                escalate_to = p.tools.escalate_to  # the most specific policy names the escalation tool
            if p.on_store_error == "fail_closed":
                fail_open = False
        output_rules.extend(cp.output_rules)
        if cp.output_schema is not None:
            output_schemas.append(cp.output_schema)
        patterns.extend(cp.deny_patterns)
    costs = [cp.policy.cost for cp in matched if not cp.shadow and cp.policy.cost is not None]
    shadow_costs = [cp.policy.cost for cp in matched if cp.shadow and cp.policy.cost is not None]
    return Effective(
        revision=revision,
        policy_names=tuple(cp.name for cp in matched),
        model_gates=model_gates,
        params={k: tuple(v) for k, v in params.items()},
        gates=tuple(cp.gate for cp in matched),
        tool_rules={k: tuple(v) for k, v in tool_rules.items()},
        tool_schemas={k: tuple(v) for k, v in tool_schemas.items()},
        once_tools=frozenset(once),
        escalate_to=escalate_to,
        output_rules=tuple(output_rules),
        output_schemas=tuple(output_schemas),
        deny_patterns=tuple(patterns),
        cost=combine(costs) if costs else None,
        fail_open=fail_open,
        shadow_once_tools=frozenset(shadow_once - once),
        shadow_cost=combine(costs + shadow_costs) if shadow_costs else None,
    )
