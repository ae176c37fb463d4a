"""Concrete spend counters for one request: which ceilings it is charged against, by name and window.

Windows: ``day`` and ``month`` are UTC calendar windows. ``minutes: N`` is an approximation of a rolling
window: fixed buckets of N minutes aligned to the Unix epoch, so spend resets at each bucket boundary
rather than sliding. That keeps one counter per window and exact reset times. Counter names escape the
ids in them, so no key, team or org id can alias another counter; a team is named with its org.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from rules.cost import BudgetLimit, EffectiveCost
from rules.effective import DEFAULT_ORG

TTL_MARGIN_S = 3600
CONVERSATION_TTL_S = 7 * 86400


@dataclass(frozen=True)
class CeilingSpec:
    """One spend counter a request is charged against.

    ``key`` names the counter (``key:<id>:day:2026-11-25``, ``team:<t>:month:2026-11``,
    ``org:<o>:m60:<bucket>``, ``conversation:<id>``); ``reset_at`` is the window end in epoch seconds
    (``None`` for conversations); ``ttl_s`` outlives the window so late settlements still land.
    """

    key: str
    limit: int
    ttl_s: int
    scope: str
    window: str | None
    reset_at: float | None


def escape_ident(ident: str) -> str:
    """Escape ``%`` and ``:`` in an id, so "a:b" as a key id can never alias another counter's name."""
    return ident.replace("%", "%25").replace(":", "%3A")


def team_counter_id(org: str | None, team: str) -> str:
    """A team's identity in counter names: teams are ``(org, team)``, so ``support`` in two orgs never
    shares a counter. The default org keeps the bare team name (``team:support:...``); any other org is
    ``<org>/<team>``, with ``/`` escaped inside both parts so no pair can alias another."""
    esc_team = escape_ident(team).replace("/", "%2F")
    if org in (None, DEFAULT_ORG):
        return esc_team
    return escape_ident(org).replace("/", "%2F") + "/" + esc_team


def _window_bounds(b: BudgetLimit, now: datetime) -> tuple[str, str, datetime, datetime]:
    """(window name, period label, start, end) of the window containing ``now``."""
    if b.minutes is not None:
        length = b.minutes * 60
        bucket = math.floor(now.timestamp()) // length
        start = datetime.fromtimestamp(bucket * length, UTC)
        return f"m{b.minutes}", str(bucket), start, start + timedelta(seconds=length)
    if b.window == "day":
        start = datetime(now.year, now.month, now.day, tzinfo=UTC)
        return "day", start.date().isoformat(), start, start + timedelta(days=1)
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    end = datetime(now.year + 1, 1, 1, tzinfo=UTC) if now.month == 12 else start.replace(month=now.month + 1)
    return "month", f"{now.year:04d}-{now.month:02d}", start, end


def ceilings_for(
    eff: EffectiveCost,
    *,
    key_id: str,
    team: str | None,
    org: str | None,
    conversation: str | None,
    now: datetime,
) -> list[CeilingSpec]:
    """Concrete counters for one request at ``now`` (timezone-aware; windows are UTC).

    A budget whose scope the request lacks (no team, no org) and a conversation limit without a
    conversation id yield no counter: there is nothing to charge. The per-request limit is not a
    counter; see :func:`check_per_request`. A team is identified with its org (:func:`team_counter_id`).
    """
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    now = now.astimezone(UTC)
    out: list[CeilingSpec] = []
    if eff.per_conversation is not None and conversation is not None:
        key = f"conversation:{escape_ident(conversation)}"
        out.append(CeilingSpec(key, eff.per_conversation, CONVERSATION_TTL_S, "conversation", None, None))
    owners: dict[str, str | None] = {"key": escape_ident(key_id),
                                     "team": team_counter_id(org, team) if team is not None else None,
                                     "org": escape_ident(org) if org is not None else None}
    for b in eff.budgets:
        owner = owners[b.scope]
        if owner is None:
            continue
        window, label, start, end = _window_bounds(b, now)
        ttl_s = int((end - start).total_seconds()) + TTL_MARGIN_S
        key = f"{b.scope}:{owner}:{window}:{label}"
        out.append(CeilingSpec(key, b.limit, ttl_s, b.scope, window, end.timestamp()))
    return out
