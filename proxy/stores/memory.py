"""In-process state store for a single replica (tests, dev, one-box deployments).

Same semantics as the Redis store. Atomicity comes from asyncio itself: no method
awaits inside its critical section, so coroutines cannot interleave halfway
through a reservation or a consume. Not thread-safe (one event loop owns it).
Expiry is evaluated against the caller's ``now`` for budgets and approvals and
against ``clock`` (default ``time.time``) for retention TTLs.

Bounded: at most ``max_entries`` entries (budget windows, idempotency records,
once-markers, approvals, feedback verdicts). Every write drops a few expired
entries (:class:`._expiring.ExpiringMap`, cost paid once per entry); a write that
would go over the bound first drops every expired entry and, if the store is
still full, raises :class:`StoreUnavailable`; live entries are never evicted.
Two deliberate exceptions: ``settle`` is never refused (it records money already
spent upstream, for a reservation the bound admitted), and the settled-id memory
(dedupe of repeated settles, 15 minutes) has its own cap of ``max_entries`` and
forgets its oldest ids first.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._expiring import ExpiringMap
from .base import (
    APPROVAL_STATUSES,
    SETTLE_MEMORY_S,
    Approval,
    ApprovalStatus,
    Ceiling,
    Decided,
    IdemBegin,
    ReserveResult,
    Store,
    StoreUnavailable,
    check_reserve_args,
    effective,
    fullest,
)

# Due entries looked at per write by the incremental sweep: enough to keep up with any write rate
# (each write adds at most a few entries), small enough that no single write pays for a mass expiry.
_SWEEP_STEP = 32


@dataclass
class _Window:
    settled: int = 0
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)  # rid -> (amount, expires_at)
    expires_at: float = 0.0

    def live(self, now: float) -> int:
        dead = [rid for rid, (_, exp) in self.holds.items() if now >= exp]
        for rid in dead:
            del self.holds[rid]
        return self.settled + sum(a for a, _ in self.holds.values())


@dataclass(frozen=True)
class _Idem:
    done: bool
    body_hash: str
    record: bytes | None
    expires_at: float


@dataclass(frozen=True)
class _Verdict:
    outcome: str
    by: str
    expires_at: float


class MemoryStore(Store):
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        approval_retention_s: float = 7 * 86400,
        max_entries: int = 1_000_000,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._clock = clock
        self._max = max_entries
        retention = approval_retention_s
        self._windows: ExpiringMap[str, _Window] = ExpiringMap(lambda w: w.expires_at)
        self._settled_ids: dict[str, float] = {}  # rid -> forget at, in insertion order
        self._idem: ExpiringMap[str, _Idem] = ExpiringMap(lambda r: r.expires_at)
        self._once: ExpiringMap[tuple[str, str], float] = ExpiringMap(lambda t: t)
        # an approval is kept (any status) until its retention after expiry has passed
        self._approvals: ExpiringMap[str, Approval] = ExpiringMap(lambda a: a.expires_at + retention)
        self._feedback: ExpiringMap[str, _Verdict] = ExpiringMap(lambda v: v.expires_at)
        self._closed = False
        # Budgets and approvals run on the callers' clock; their sweep uses the latest seen.
        self._budget_now = 0.0
        self._approval_now = 0.0

    # -- budgets -----------------------------------------------------------
    def _fill(self, c: Ceiling, now: float) -> int:
        w = self._windows.live(c.key, now)
        return 0 if w is None else w.live(now)

    async def reserve(
        self, ceilings: Sequence[Ceiling], amount: int, *, now: float, ttl_s: int = 300
    ) -> ReserveResult:
        check_reserve_args(ceilings, amount)
        self._budget_now = max(self._budget_now, now)
        self._tick()
        # Fills are read without creating windows: a refused reservation leaves no state behind.
        fills = {c.key: self._fill(c, now) for c in ceilings}
        for c in ceilings:
            if fills[c.key] + amount > c.limit:
                return ReserveResult(False, None, c, fills[c.key], fills)
        self._room(lambda: sum(c.key not in self._windows for c in ceilings))
        rid = uuid.uuid4().hex
        for c in ceilings:
            w = self._window(c, now)
            w.holds[rid] = (amount, now + ttl_s)
            w.expires_at = now + max(c.ttl_s, ttl_s)
        after = {k: v + amount for k, v in fills.items()}
        return ReserveResult(True, rid, None, after[fullest(ceilings, after).key], fills)

    def _window(self, c: Ceiling, now: float) -> _Window:
        w = self._windows.live(c.key, now)
        if w is None:
            w = _Window(expires_at=now + c.ttl_s)
            self._windows.set(c.key, w)
        return w

    async def usage(self, ceilings: Sequence[Ceiling], *, now: float) -> dict[str, int]:
        return {c.key: self._fill(c, now) for c in ceilings}

    async def settle(
        self, reservation_id: str, ceilings: Sequence[Ceiling], actual: int, *, now: float
    ) -> None:
        if actual < 0:
            raise ValueError("actual must be >= 0")
        forget = self._settled_ids.get(reservation_id)
        if forget is not None and self._clock() < forget:
            return
        self._budget_now = max(self._budget_now, now)
        self._tick()
        for c in ceilings:
            # a charge is never refused for room (see the module docstring); a release creates nothing
            w = self._window(c, now) if actual else self._windows.live(c.key, now)
            if w is None:
                continue
            w.holds.pop(reservation_id, None)
            if actual:
                w.settled += actual
                w.expires_at = max(w.expires_at, now + c.ttl_s)
        self._settled_ids.pop(reservation_id, None)  # re-inserted last, so the order stays by forget time
        if len(self._settled_ids) >= self._max:
            del self._settled_ids[next(iter(self._settled_ids))]
        self._settled_ids[reservation_id] = self._clock() + SETTLE_MEMORY_S

    async def spend(self, prefix: str = "") -> dict[str, int]:
        now = self._budget_now  # windows live on the callers' clock
        return {
            k: w.settled
            for k, w in self._windows.items()
            if k.startswith(prefix) and now < w.expires_at and w.settled
        }

    # -- idempotency -------------------------------------------------------
    async def idem_begin(self, key: str, body_hash: str, *, ttl_s: float, lock_s: float) -> IdemBegin:
        now = self._clock()
        rec = self._idem.live(key, now)
        if rec is None:
            self._tick()
            self._room(lambda: int(key not in self._idem))
            self._idem.set(key, _Idem(False, body_hash, None, now + lock_s))
            return IdemBegin("new")
        if rec.body_hash != body_hash:
            return IdemBegin("mismatch")
        if rec.done:
            return IdemBegin("replay", rec.record)
        return IdemBegin("in_flight")

    async def idem_complete(self, key: str, body_hash: str, record: bytes, *, ttl_s: float) -> None:
        self._tick()
        self._room(lambda: int(key not in self._idem))
        self._idem.set(key, _Idem(True, body_hash, bytes(record), self._clock() + ttl_s))

    async def idem_abort(self, key: str) -> None:
        rec = self._idem.get(key)
        if rec is not None and not rec.done:
            self._idem.pop(key)

    # -- duplicate tool calls ----------------------------------------------
    async def mark_once(self, conversation: str, call_hash: str, *, ttl_s: float) -> bool:
        now = self._clock()
        k = (conversation, call_hash)
        if self._once.live(k, now) is not None:
            return False
        self._tick()
        self._room(lambda: int(k not in self._once))
        self._once.set(k, now + ttl_s)
        return True

    async def unmark_once(self, conversation: str, call_hash: str) -> None:
        self._once.pop((conversation, call_hash))

    # -- approvals ---------------------------------------------------------
    async def approval_create(self, a: Approval) -> None:
        self._approval_now = max(self._approval_now, a.created_at)
        self._tick()
        if a.id in self._approvals:
            return  # never overwritten
        self._room(lambda: int(a.id not in self._approvals))
        self._approvals.set(a.id, a)

    async def approval_get(self, id: str, *, now: float | None = None) -> Approval | None:
        a = self._approvals.get(id)
        return None if a is None else effective(a, now)

    async def approval_list(self, status: str | None, *, now: float) -> list[Approval]:
        items = [effective(a, now) for a in self._approvals.values()]
        items.sort(key=lambda a: a.created_at, reverse=True)
        return [a for a in items if status is None or a.status == status]

    async def approval_decide(
        self, id: str, approve: bool, note: str | None, by: str | None, *, now: float
    ) -> Decided:
        a = self._approvals.get(id)
        if a is None:
            return Decided(None, False)
        if a.status != "pending" or now >= a.expires_at:
            return Decided(effective(a, now), False)
        a = dataclasses.replace(
            a, status="approved" if approve else "rejected", note=note, decided_by=by, decided_at=now
        )
        self._approvals.set(id, a)
        return Decided(a, True)

    async def approval_find(
        self, conversation: str, tool: str, args_hash: str, *, now: float
    ) -> Approval | None:
        hits = [
            a
            for a in self._approvals.values()
            if a.conversation == conversation and a.tool == tool and a.args_hash == args_hash
        ]
        return effective(max(hits, key=lambda a: a.created_at), now) if hits else None

    async def approval_consume(self, id: str, *, now: float) -> bool:
        return self._move(id, "approved", "used")

    async def approval_unconsume(self, id: str, *, now: float) -> bool:
        return self._move(id, "used", "approved")

    def _move(self, id: str, old: ApprovalStatus, new: ApprovalStatus) -> bool:
        a = self._approvals.get(id)
        if a is None or a.status != old:
            return False
        self._approvals.set(id, dataclasses.replace(a, status=new))
        return True

    async def approval_counts(self, *, now: float | None = None) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(APPROVAL_STATUSES, 0)
        for a in self._approvals.values():
            counts[effective(a, now).status] += 1
        return counts

    # -- feedback ----------------------------------------------------------
    async def feedback_set(self, decision_id: str, outcome: str, by: str, *, ttl_s: float) -> str | None:
        now = self._clock()
        prev = self._feedback.live(decision_id, now)
        self._tick()
        self._room(lambda: int(decision_id not in self._feedback))
        self._feedback.set(decision_id, _Verdict(outcome, by, now + ttl_s))
        return None if prev is None else prev.outcome

    # -- lifecycle ---------------------------------------------------------
    async def ping(self) -> bool:
        return not self._closed

    async def close(self) -> None:
        self._closed = True

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "memory",
            "state": "ok",
            "windows": len(self._windows),
            "idempotency_keys": len(self._idem),
            "once_markers": len(self._once),
            "approvals": len(self._approvals),
            "feedback": len(self._feedback),
            "entries": self._entries(),
            "max_entries": self._max,
            "settled_ids": len(self._settled_ids),
        }

    # -- housekeeping ------------------------------------------------------
    def _entries(self) -> int:
        return len(self._windows) + len(self._idem) + len(self._once) + len(self._approvals) + len(self._feedback)

    def _room(self, new: Callable[[], int]) -> None:
        """Room for ``new()`` more entries, or StoreUnavailable; only expired entries are ever dropped."""
        n = new()
        if n == 0 or self._entries() + n <= self._max:
            return
        self._sweep(None)
        if self._entries() + new() > self._max:
            raise StoreUnavailable(f"memory store full: {self._max} live entries (store_max_entries)")

    def _tick(self) -> None:
        self._sweep(_SWEEP_STEP)

    def _sweep(self, limit: int | None) -> None:
        now = self._clock()
        self._windows.sweep(self._budget_now, limit)
        self._idem.sweep(now, limit)
        self._once.sweep(now, limit)
        self._approvals.sweep(self._approval_now, limit)
        self._feedback.sweep(now, limit)
        # All settled ids share one lifetime and sit in forget-time order: the first live one ends the sweep.
        expired: list[str] = []
        for k, t in self._settled_ids.items():
            if now < t or (limit is not None and len(expired) >= limit):
                break
            expired.append(k)
        for k in expired:
            del self._settled_ids[k]
