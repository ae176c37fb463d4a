"""The state-store interface shared by every backend.

One async interface, several backends (``memory`` for one process, Redis for many
replicas). It holds the small amount of shared state the proxy needs:

* budgets: atomic all-or-nothing reservations against several ceilings, settled
  later with the actual cost; reservations expire so a crashed replica cannot
  leak budget;
* idempotency records (in-flight marker, then the finished response bytes);
* "once per conversation" markers for duplicate tool calls;
* human approvals;
* one feedback verdict per decision.

Money is always integer micro-dollars (µ$). Where time matters for a decision the
caller passes ``now`` (epoch seconds) so tests control the clock; pure retention
TTLs (idempotency, once-markers, window counters) are enforced by the backend.

Every method may raise :class:`StoreUnavailable` when the backend cannot be
reached; callers map it to ``state_unavailable`` (503) or fail open.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "APPROVAL_STATUSES",
    "Approval",
    "ApprovalStatus",
    "Ceiling",
    "Decided",
    "IdemBegin",
    "IdemState",
    "ReserveResult",
    "Store",
    "StoreUnavailable",
    "fullest",
]

ApprovalStatus = Literal["pending", "approved", "rejected", "expired", "used"]
APPROVAL_STATUSES: tuple[ApprovalStatus, ...] = ("pending", "approved", "rejected", "expired", "used")
IdemState = Literal["new", "in_flight", "replay", "mismatch"]


class StoreUnavailable(Exception):
    """The backend cannot be reached (timeout, refused connection, circuit open)."""


@dataclass(frozen=True)
class Ceiling:
    """One budget window: ``key`` is unique per scope and window, e.g.
    ``"key:support-agent:day:20261125"`` (the store adds its own prefix)."""

    key: str
    limit: int
    ttl_s: int
    scope: str
    window: str
    reset_at: float | None = None


@dataclass(frozen=True)
class ReserveResult:
    """Outcome of :meth:`Store.reserve`.

    ``spent`` is settled+live-reserved on the failing ceiling (unchanged, since a
    failed reservation changes nothing) or, when ok, on the fullest ceiling *after*
    this reservation. ``fills`` maps each ceiling key to settled+live-reserved
    *before* this reservation.
    """

    ok: bool
    reservation_id: str | None
    failed: Ceiling | None
    spent: int
    fills: dict[str, int]


@dataclass(frozen=True)
class IdemBegin:
    """``new``: caller owns the key now; ``in_flight``: another request holds it;
    ``replay``: ``record`` holds the stored response; ``mismatch``: same key, other body."""

    state: IdemState
    record: bytes | None = None


@dataclass(frozen=True)
class Approval:
    """A human approval request for one tool call."""

    id: str
    principal: str
    team: str
    conversation: str
    tool: str
    args_hash: str
    rule_id: str
    reason: str
    created_at: float
    expires_at: float
    status: ApprovalStatus = "pending"
    note: str | None = None
    decided_by: str | None = None
    decided_at: float | None = None


@dataclass(frozen=True)
class Decided:
    """Outcome of :meth:`Store.approval_decide`: the approval as it stands after the call
    (``None`` if unknown) and whether *this* call made the pending -> approved/rejected step.
    Of concurrent deciders exactly one sees ``changed``."""

    approval: Approval | None
    changed: bool


def fullest(ceilings: Sequence[Ceiling], used: dict[str, int]) -> Ceiling:
    """The ceiling with the highest used/limit ratio (integer cross-multiplication;
    a non-positive limit counts as full)."""

    def beats(a: Ceiling, b: Ceiling) -> bool:
        ua, ub = used.get(a.key, 0), used.get(b.key, 0)
        if b.limit <= 0:
            return False
        if a.limit <= 0:
            return True
        return ua * b.limit > ub * a.limit

    best = ceilings[0]
    for c in ceilings[1:]:
        if beats(c, best):
            best = c
    return best


def check_reserve_args(ceilings: Sequence[Ceiling], amount: int) -> None:
    """Shared argument validation for every backend."""
    if not ceilings:
        raise ValueError("reserve needs at least one ceiling")
    if amount < 0:
        raise ValueError("amount must be >= 0")
    if len({c.key for c in ceilings}) != len(ceilings):
        raise ValueError("duplicate ceiling keys")


# How long a settled reservation id is remembered so a repeated settle is a no-op. Settles are
# retried within seconds; one marker per request, so a day-long memory would cost gigabytes
# at 1000 req/s, while 15 minutes costs ~1M small keys.
SETTLE_MEMORY_S = 900


class Store(abc.ABC):
    """Async state store. All money is integer µ$; ``now`` is epoch seconds."""

    # -- budgets -----------------------------------------------------------
    @abc.abstractmethod
    async def reserve(
        self, ceilings: Sequence[Ceiling], amount: int, *, now: float, ttl_s: int = 300
    ) -> ReserveResult:
        """All or nothing: fail (changing nothing) if any ceiling would exceed its
        limit, else hold ``amount`` against every ceiling until settled or ``ttl_s``."""

    @abc.abstractmethod
    async def usage(self, ceilings: Sequence[Ceiling], *, now: float) -> dict[str, int]:
        """settled + live reserved per ceiling key."""

    @abc.abstractmethod
    async def settle(
        self, reservation_id: str, ceilings: Sequence[Ceiling], actual: int, *, now: float
    ) -> None:
        """Replace the reservation by ``actual`` on every ceiling; idempotent per id.
        An unknown or expired reservation still charges ``actual``."""

    async def release(self, reservation_id: str, ceilings: Sequence[Ceiling], *, now: float) -> None:
        """Drop a reservation without charging (settle with 0)."""
        await self.settle(reservation_id, ceilings, 0, now=now)

    @abc.abstractmethod
    async def spend(self, prefix: str = "") -> dict[str, int]:
        """Settled spend per ceiling key starting with ``prefix`` (for reporting)."""

    # -- idempotency -------------------------------------------------------
    @abc.abstractmethod
    async def idem_begin(self, key: str, body_hash: str, *, ttl_s: float, lock_s: float) -> IdemBegin:
        """Claim ``key`` for one request (in-flight marker lives ``lock_s``)."""

    @abc.abstractmethod
    async def idem_complete(self, key: str, body_hash: str, record: bytes, *, ttl_s: float) -> None:
        """Store the finished response bytes for ``ttl_s``."""

    @abc.abstractmethod
    async def idem_abort(self, key: str) -> None:
        """Drop an in-flight marker so a retry can proceed (completed records stay)."""

    # -- duplicate tool calls ----------------------------------------------
    @abc.abstractmethod
    async def mark_once(self, conversation: str, call_hash: str, *, ttl_s: float) -> bool:
        """True the first time (conversation, call_hash) is seen within ``ttl_s``."""

    @abc.abstractmethod
    async def unmark_once(self, conversation: str, call_hash: str) -> None:
        """Forget a :meth:`mark_once` marker (its call was never delivered); no-op if absent."""

    # -- approvals ---------------------------------------------------------
    @abc.abstractmethod
    async def approval_create(self, a: Approval) -> None: ...

    @abc.abstractmethod
    async def approval_get(self, id: str, *, now: float | None = None) -> Approval | None:
        """The approval, reported ``expired`` when pending past expiry and ``now`` is given."""

    @abc.abstractmethod
    async def approval_list(self, status: str | None, *, now: float) -> list[Approval]:
        """Newest first; pending past expiry are reported as expired."""

    @abc.abstractmethod
    async def approval_decide(
        self, id: str, approve: bool, note: str | None, by: str | None, *, now: float
    ) -> Decided:
        """pending -> approved/rejected, atomically; ``changed`` tells whether this call did it.
        Unknown: ``Decided(None, False)``; not pending (or expired): unchanged, ``changed`` False."""

    @abc.abstractmethod
    async def approval_find(
        self, conversation: str, tool: str, args_hash: str, *, now: float
    ) -> Approval | None:
        """Latest approval for this exact call, any status."""

    @abc.abstractmethod
    async def approval_consume(self, id: str, *, now: float) -> bool:
        """approved -> used, exactly once across concurrent callers."""

    @abc.abstractmethod
    async def approval_unconsume(self, id: str, *, now: float) -> bool:
        """used -> approved (the consumed use was never delivered); True if this call changed it.
        Any other status is left alone."""

    @abc.abstractmethod
    async def approval_counts(self, *, now: float | None = None) -> dict[str, int]:
        """Count per status (every status present, zero included)."""

    # -- feedback ----------------------------------------------------------
    @abc.abstractmethod
    async def feedback_set(self, decision_id: str, outcome: str, by: str, *, ttl_s: float) -> str | None:
        """Store the one verdict for ``decision_id`` (kept ``ttl_s``), replacing any earlier one,
        atomically; returns the previous outcome, None if this is the first."""

    # -- lifecycle ---------------------------------------------------------
    @abc.abstractmethod
    async def ping(self) -> bool:
        """True when the backend answers; never raises."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Backend name and health for /health and logs; never contains secrets."""


def effective(a: Approval, now: float | None) -> Approval:
    """``a`` as reported at ``now``: pending past its expiry reads as expired."""
    if now is not None and a.status == "pending" and now >= a.expires_at:
        return dataclasses.replace(a, status="expired")
    return a
