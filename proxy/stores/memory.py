"""In-process state store for a single replica (tests, dev, one-box deployments).

Same semantics as the Redis store. Atomicity comes from asyncio itself: no method
awaits inside its critical section, so coroutines cannot interleave halfway
through a reservation or a consume. Not thread-safe (one event loop owns it).
Expiry is evaluated against the caller's ``now`` for budgets and approvals and
against ``clock`` (default ``time.time``) for retention TTLs; expired entries are
dropped lazily and by a periodic sweep so memory stays bounded.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .base import (
    APPROVAL_STATUSES,
    SETTLE_MEMORY_S,
    Approval,
    Ceiling,
    IdemBegin,
    ReserveResult,
    Store,
    check_reserve_args,
    effective,
    fullest,
)

_SWEEP_EVERY = 1024


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


@dataclass
class _Idem:
    done: bool
    body_hash: str
    record: bytes | None
    expires_at: float


class MemoryStore(Store):
    def __init__(self, *, clock: Callable[[], float] = time.time, approval_retention_s: float = 7 * 86400):
        self._clock = clock
        self._retention = approval_retention_s
        self._windows: dict[str, _Window] = {}
        self._settled_ids: dict[str, float] = {}  # rid -> forget at
        self._idem: dict[str, _Idem] = {}
        self._once: dict[tuple[str, str], float] = {}
        self._approvals: dict[str, Approval] = {}
        self._writes = 0
        self._closed = False
        # Budgets and approvals run on the callers' clock; the sweep uses the latest seen.
        self._budget_now = 0.0
        self._approval_now = 0.0

    # -- budgets -----------------------------------------------------------
    def _window(self, c: Ceiling, now: float) -> _Window:
        w = self._windows.get(c.key)
        if w is None or now >= w.expires_at:
            w = self._windows[c.key] = _Window(expires_at=now + c.ttl_s)
        return w

    async def reserve(
        self, ceilings: Sequence[Ceiling], amount: int, *, now: float, ttl_s: int = 300
    ) -> ReserveResult:
        check_reserve_args(ceilings, amount)
        self._budget_now = max(self._budget_now, now)
        self._tick()
        fills = {c.key: self._window(c, now).live(now) for c in ceilings}
        for c in ceilings:
            if fills[c.key] + amount > c.limit:
                return ReserveResult(False, None, c, fills[c.key], fills)
        rid = uuid.uuid4().hex
        for c in ceilings:
            w = self._window(c, now)
            w.holds[rid] = (amount, now + ttl_s)
            w.expires_at = now + max(c.ttl_s, ttl_s)
        after = {k: v + amount for k, v in fills.items()}
        return ReserveResult(True, rid, None, after[fullest(ceilings, after).key], fills)

    async def usage(self, ceilings: Sequence[Ceiling], *, now: float) -> dict[str, int]:
        out = {}
        for c in ceilings:
            w = self._windows.get(c.key)
            out[c.key] = 0 if w is None or now >= w.expires_at else w.live(now)
        return out

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
            w = self._window(c, now)
            w.holds.pop(reservation_id, None)
            if actual:
                w.settled += actual
                w.expires_at = max(w.expires_at, now + c.ttl_s)
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
        rec = self._idem.get(key)
        if rec is None or now >= rec.expires_at:
            self._tick()
            self._idem[key] = _Idem(False, body_hash, None, now + lock_s)
            return IdemBegin("new")
        if rec.body_hash != body_hash:
            return IdemBegin("mismatch")
        if rec.done:
            return IdemBegin("replay", rec.record)
        return IdemBegin("in_flight")

    async def idem_complete(self, key: str, body_hash: str, record: bytes, *, ttl_s: float) -> None:
        self._tick()
        self._idem[key] = _Idem(True, body_hash, bytes(record), self._clock() + ttl_s)

    async def idem_abort(self, key: str) -> None:
        rec = self._idem.get(key)
        if rec is not None and not rec.done:
            del self._idem[key]

    # -- duplicate tool calls ----------------------------------------------
    async def mark_once(self, conversation: str, call_hash: str, *, ttl_s: float) -> bool:
        now = self._clock()
        k = (conversation, call_hash)
        exp = self._once.get(k)
        if exp is not None and now < exp:
            return False
        self._tick()
        self._once[k] = now + ttl_s
        return True

    # -- approvals ---------------------------------------------------------
    async def approval_create(self, a: Approval) -> None:
        self._approval_now = max(self._approval_now, a.created_at)
        self._tick()
        self._approvals.setdefault(a.id, a)

    async def approval_get(self, id: str, *, now: float | None = None) -> Approval | None:
        a = self._approvals.get(id)
        return None if a is None else effective(a, now)

    async def approval_list(self, status: str | None, *, now: float) -> list[Approval]:
        items = [effective(a, now) for a in self._approvals.values()]
        items.sort(key=lambda a: a.created_at, reverse=True)
        return [a for a in items if status is None or a.status == status]

    async def approval_decide(
        self, id: str, approve: bool, note: str | None, by: str | None, *, now: float
    ) -> Approval | None:
        a = self._approvals.get(id)
        if a is None:
            return None
        if a.status != "pending" or now >= a.expires_at:
            return effective(a, now)
        a = dataclasses.replace(
            a, status="approved" if approve else "rejected", note=note, decided_by=by, decided_at=now
        )
        self._approvals[id] = a
        return a

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
        a = self._approvals.get(id)
        if a is None or a.status != "approved":
            return False
        self._approvals[id] = dataclasses.replace(a, status="used")
        return True

    async def approval_counts(self, *, now: float | None = None) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(APPROVAL_STATUSES, 0)
        for a in self._approvals.values():
            counts[effective(a, now).status] += 1
        return counts

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
            "approvals": len(self._approvals),
        }

    # -- housekeeping ------------------------------------------------------
    def _tick(self) -> None:
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            self._sweep(self._clock())

    def _sweep(self, now: float) -> None:
        for k in [k for k, w in self._windows.items() if self._budget_now >= w.expires_at]:
            del self._windows[k]
        # One entry per request, all with the same lifetime, in insertion order: stop at the first live one
        # instead of scanning every id remembered in the last SETTLE_MEMORY_S (over a million under load).
        expired_ids = []
        for k, t in self._settled_ids.items():
            if now < t:
                break
            expired_ids.append(k)
        for k in expired_ids:
            del self._settled_ids[k]
        for k in [k for k, r in self._idem.items() if now >= r.expires_at]:
            del self._idem[k]
        for o in [o for o, t in self._once.items() if now >= t]:
            del self._once[o]
        horizon = self._approval_now - self._retention
        for k in [k for k, a in self._approvals.items() if a.expires_at < horizon]:
            del self._approvals[k]
