"""Warnings where a more specific policy tries to loosen a broader one.

Layering is enforced restrictively at evaluation whatever is written (see
:mod:`rules.effective`), so these are warnings, not errors: they tell the
author that a line in a team or key policy has no effect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rules.effective import CompiledPolicy
from rules.loader import LoadedPolicy
from rules.yamlsrc import Path, SourceError, format_path


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
            for pname, lim in np_.models.params.items():
                blim = bp.models.params.get(pname)
                if blim is None:
                    continue
                if blim.max is not None and (lim.max is None or lim.max > blim.max):
                    warn(narrow, ("models", "params", pname),
                         f"{pname} max is looser than {broad.name}'s {blim.max}; the lower limit applies")
                if blim.min is not None and (lim.min is None or lim.min < blim.min):
                    warn(narrow, ("models", "params", pname),
                         f"{pname} min is looser than {broad.name}'s {blim.min}; the higher limit applies")
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
