"""Where a more specific policy tries to loosen a broader one, or contradicts it.

Layering is enforced restrictively at evaluation whatever is written (see
:mod:`rules.effective`), so a loosening line is a warning: it tells the author
that a line in a team or key policy has no effect. A contradiction is an
error: when two enforcing policies that may apply to the same caller leave a
parameter no value (a team ``min`` above the org ``max``), no clamp can satisfy
both, and "a team cannot loosen an org limit" could only be kept by ignoring
the team. Both token names (``max_tokens``, ``max_completion_tokens``) are one
limit, and token counts are whole numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rules.effective import CompiledPolicy, limit_group, team_ref
from rules.loader import LoadedPolicy
from rules.model import Match
from rules.yamlsrc import Path, SourceError, format_path


@dataclass(frozen=True)
class _Bound:
    value: float
    policy: CompiledPolicy
    param: str  # the name the policy uses

    def describe(self, side: str) -> str:
        return f"{self.policy.name}'s {self.param} {side} {_num(self.value)}"


def _num(x: float) -> str:
    return str(int(x)) if x.is_integer() else str(x)


def may_co_apply(a: Match, b: Match) -> bool:
    """Whether some principal may match both; only provably disjoint matches say no.

    A key's team is not known to the policies, so a key list and a team list may always meet.
    """
    if a.all or b.all or (a.keys and b.teams) or (a.teams and b.keys):
        return True
    return bool(set(a.keys) & set(b.keys)) or bool({team_ref(t) for t in a.teams} & {team_ref(t) for t in b.teams})


def _bounds(cp: CompiledPolicy, group: str) -> tuple[list[_Bound], list[_Bound]]:
    mins, maxes = [], []
    for pname, lim in cp.policy.models.params.items():
        if limit_group(pname) != group:
            continue
        if lim.min is not None:
            mins.append(_Bound(lim.min, cp, pname))
        if lim.max is not None:
            maxes.append(_Bound(lim.max, cp, pname))
    return mins, maxes


def _conflict(group: str, pair: Sequence[CompiledPolicy]) -> tuple[_Bound, _Bound] | None:
    """The (min, max) bounds of the pair's policies that leave ``group`` no value, if any."""
    mins = [b for cp in pair for b in _bounds(cp, group)[0]]
    maxes = [b for cp in pair for b in _bounds(cp, group)[1]]
    if not mins or not maxes:
        return None
    low = max(mins, key=lambda b: b.value)
    high = min(maxes, key=lambda b: b.value)
    if group == "max_tokens":
        return (low, high) if math.ceil(low.value) > math.floor(high.value) else None
    return (low, high) if low.value > high.value else None


def interval_errors(compiled: Sequence[CompiledPolicy], loaded: Mapping[str, LoadedPolicy]) -> list[SourceError]:
    """Every parameter that two enforcing policies which may apply together leave without a value.

    ``compiled`` is ordered org, team, key; the error is located on the narrower policy's limit.
    """
    enforcing = [cp for cp in compiled if not cp.shadow]
    out: dict[tuple[str, str], SourceError] = {}
    for i, broad in enumerate(enforcing):
        for narrow in enforcing[i:]:  # a policy with itself too: both token names, or no whole number
            if narrow is not broad and not may_co_apply(broad.policy.match, narrow.policy.match):
                continue
            for group in dict.fromkeys(limit_group(n) for n in narrow.policy.models.params):
                hit = _conflict(group, (broad,) if narrow is broad else (broad, narrow))
                if hit is None:
                    continue
                low, high = hit
                if low.policy is not narrow and high.policy is not narrow:
                    continue  # the broader policy contradicts itself: reported on its own file
                own = low if low.policy is narrow else high
                located = loaded[narrow.name].located
                path: Path = ("models", "params", own.param)
                if low.value > high.value:
                    message = f"{low.describe('min')} is above {high.describe('max')}: no value satisfies both"
                    if low.policy is not high.policy:
                        message += " (a narrower policy cannot loosen a broader one)"
                else:
                    message = f"no whole number of tokens lies between {low.describe('min')} and {high.describe('max')}"
                out.setdefault((located.source, format_path(path)),
                               SourceError(located.source, located.line_of(path), format_path(path), message))
    return list(out.values())


def _looser_params(broad: CompiledPolicy, narrow: CompiledPolicy, group: str, first: str) -> list[tuple[str, str]]:
    """(param name, message) where ``narrow``'s limit ``group`` is looser than ``broad``'s."""
    out = []
    bmins, bmaxes = _bounds(broad, group)
    nmins, nmaxes = _bounds(narrow, group)
    for side, bb, nb, tighter in (("max", bmaxes, nmaxes, min), ("min", bmins, nmins, max)):
        if not bb:
            continue
        broad_bound = tighter(bb, key=lambda b: b.value)
        own = tighter(nb, key=lambda b: b.value) if nb else None
        if own is None:
            out.append((first, f"{first} has no {side} here; {broad_bound.describe(side)} applies"))
        elif tighter(own.value, broad_bound.value) != own.value:
            out.append((own.param, f"{own.param} {side} {_num(own.value)} is looser than "
                                   f"{broad_bound.describe(side)}, which applies"))
    return out


def loosening_warnings(
    compiled: Sequence[CompiledPolicy], loaded: Mapping[str, LoadedPolicy]
) -> list[SourceError]:
    """Every place a lower policy allows what a higher one forbids."""
    out: list[SourceError] = []

    def warn(cp: CompiledPolicy, path: Path, message: str) -> None:
        located = loaded[cp.name].located
        out.append(SourceError(located.source, located.line_of(path), format_path(path), message, "warning"))

    for broad in compiled:
        for narrow in compiled:
            # Any broader policy may apply to a narrower one's principals (a key's team is not known
            # here), so every lower level is compared with every higher one.
            if broad.policy.level >= narrow.policy.level:
                continue
            bp, np_ = broad.policy, narrow.policy
            if bp.models.allow is not None and np_.models.allow is not None:
                for m in np_.models.allow:
                    if m not in bp.models.allow:
                        warn(narrow, ("models", "allow"),
                             f"model {m!r} is not allowed by {broad.name}; it stays refused")
            groups: dict[str, str] = {}
            for pname in np_.models.params:
                groups.setdefault(limit_group(pname), pname)
            for group, first in groups.items():
                for pname, msg in _looser_params(broad, narrow, group, first):
                    warn(narrow, ("models", "params", pname), msg)
            for tool in np_.tools.allow:
                if broad.gate.blocks(tool):
                    warn(narrow, ("tools", "allow", tool),
                         f"tool {tool!r} is denied by {broad.name}; it stays denied")
            if bp.cost is not None and np_.cost is not None:
                for fld in ("per_request_usd", "per_conversation_usd"):
                    bv, nv = getattr(bp.cost, fld), getattr(np_.cost, fld)
                    if bv is not None and nv is not None and nv > bv:
                        warn(narrow, ("cost", fld), f"{fld} is looser than {broad.name}'s; the lower applies")
    return out
