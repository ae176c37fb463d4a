"""Redis state store, shared by many proxy replicas (standalone, Sentinel or Cluster).

Atomicity: every multi-key step (reserve, settle, approval decide/consume, ...) is
one Lua script from :mod:`._lua`, registered once; all or nothing.

Cluster safety: a script may only touch keys of one hash slot, so every key one
script touches shares a hash tag: all budget keys live under ``<prefix>{b}:``,
approvals under ``<prefix>{a}:``, an idempotency record is one key
``<prefix>{i:<key>}``. Trade-off: all budget counters (and all approvals) sit in
one slot, hence on one shard: budgets do not scale out across a cluster, but a
reservation over key + team + global ceilings stays a single atomic script with
no cross-slot protocol. One shard handles tens of thousands of these scripts per
second, well above what the upstream LLM calls allow.

Failures: ``socket_timeout`` = ``socket_connect_timeout`` = ``timeout_s``, one
retry with a short exponential backoff (the client reconnects on it, so the first
call after Redis comes back succeeds), and a hard deadline of
``(retries + 1) * timeout_s + backoff`` per call. Retries are safe: reserve,
settle, mark_once, idem_begin, approval_decide/consume/unconsume and feedback_set
carry a per-call token or id, so a re-sent script whose first reply was lost does
not apply twice (and still reports what the first attempt did). After 5
consecutive failures a circuit breaker fails calls fast for 1 s. Every failure
surfaces as :class:`StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson
import redis.exceptions as rexc

from . import _lua
from ._breaker import CircuitBreaker
from ._codec import approval_fields, parse_approval
from ._redis_connect import backoff, connect, redact
from .base import (
    APPROVAL_STATUSES,
    SETTLE_MEMORY_S,
    Approval,
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

__all__ = ["UNAVAILABLE", "RedisStore", "redact"]

T = TypeVar("T")

UNAVAILABLE: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,  # includes refused, auth, loading, sentinel master not found
    rexc.TimeoutError,
    rexc.ReadOnlyError,  # talking to a demoted primary during failover
    rexc.ClusterError,
    rexc.TryAgainError,
    rexc.RedisClusterException,  # cluster cannot be reached / slots not covered
    rexc.InvalidResponse,  # the address answers, but it is not Redis
    TimeoutError,  # our hard deadline
    OSError,
)
# Server replies that mean "cannot serve now", not "bad command": out of memory, cannot persist,
# busy script, still loading, failover in progress.
_CAUGHT: tuple[type[BaseException], ...] = (*UNAVAILABLE, rexc.ResponseError)
_UNAVAILABLE_REPLIES = ("OOM", "MISCONF", "BUSY", "LOADING", "MASTERDOWN", "NOREPLICAS", "READONLY")
_BATCH = 500


def _ms(seconds: float) -> str:
    return str(max(1, int(seconds * 1000)))


def _glob_escape(s: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in s)


class RedisStore(Store):
    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "gp:",
        timeout_s: float = 0.25,
        retries: int = 1,
        mode: str = "standalone",
        target: str = "",
        breaker: CircuitBreaker | None = None,
        closers: Sequence[Callable[[], Awaitable[Any]]] = (),
        approval_retention_s: int = 7 * 86400,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("prefix must not contain a hash tag")
        self._r = client
        self._p = prefix
        self._timeout_s = timeout_s
        self._deadline_s = deadline_s(timeout_s, retries)
        self._mode = mode
        self._target = target
        self._breaker = breaker or CircuitBreaker()
        self._closers = closers
        self._retention = approval_retention_s
        s = client.register_script
        self._reserve, self._usage, self._settle = s(_lua.RESERVE), s(_lua.USAGE), s(_lua.SETTLE)
        self._idem_begin, self._idem_complete = s(_lua.IDEM_BEGIN), s(_lua.IDEM_COMPLETE)
        self._idem_abort, self._once = s(_lua.IDEM_ABORT), s(_lua.ONCE)
        self._a_create, self._a_decide = s(_lua.APPROVAL_CREATE), s(_lua.APPROVAL_DECIDE)
        self._a_consume, self._a_unconsume = s(_lua.APPROVAL_CONSUME), s(_lua.APPROVAL_UNCONSUME)
        self._feedback = s(_lua.FEEDBACK_SET)

    @classmethod
    def from_url(
        cls, url: str, *, timeout_s: float = 0.25, prefix: str = "gp:", retries: int = 1
    ) -> RedisStore:
        """``redis://``, ``rediss://``, ``redis+sentinel://[:pw@]h:p,h2:p/service[/db]``,
        ``redis+cluster://[:pw@]h:p[,h2:p]`` (``rediss+...`` for TLS)."""
        c = connect(url, timeout_s=timeout_s, retries=retries, pool_wait_s=deadline_s(timeout_s, retries))
        return cls(
            c.client,
            prefix=prefix,
            timeout_s=timeout_s,
            retries=retries,
            mode=c.mode,
            target=c.target,
            closers=c.closers,
        )

    # -- plumbing ----------------------------------------------------------
    async def _call(self, fn: Callable[[], Awaitable[T]], *, deadline: bool = True) -> T:
        if not self._breaker.allow():
            raise StoreUnavailable("state store circuit open")
        try:
            async with asyncio.timeout(self._deadline_s if deadline else None):
                out = await fn()
        except _CAUGHT as e:
            if not isinstance(e, UNAVAILABLE) and not str(e).startswith(_UNAVAILABLE_REPLIES):
                raise  # a plain ResponseError is a bug (script error, wrong type), not an outage
            if not _pool_exhausted(e):  # our own overload says nothing about Redis
                self._breaker.failure()
            raise StoreUnavailable(f"state store unavailable: {type(e).__name__}: {e}"[:300]) from e
        self._breaker.success()
        return out

    def _h(self, ckey: str) -> str:
        return f"{self._p}{{b}}:c:{ckey}"

    def _z(self, ckey: str) -> str:
        return f"{self._p}{{b}}:z:{ckey}"

    def _hz(self, ceilings: Sequence[Ceiling]) -> list[str]:
        return [k for c in ceilings for k in (self._h(c.key), self._z(c.key))]

    def _a(self, suffix: str) -> str:
        return f"{self._p}{{a}}:{suffix}"

    def _a_find_key(self, conversation: str, tool: str, args_hash: str) -> str:
        digest = hashlib.sha256(orjson.dumps([conversation, tool, args_hash])).hexdigest()
        return self._a(f"f:{digest}")

    # -- budgets -----------------------------------------------------------
    async def reserve(
        self, ceilings: Sequence[Ceiling], amount: int, *, now: float, ttl_s: int = 300
    ) -> ReserveResult:
        check_reserve_args(ceilings, amount)
        rid = uuid.uuid4().hex
        args: list[str] = [rid, str(amount), repr(float(now)), repr(float(now + ttl_s))]
        for c in ceilings:
            args += [str(c.limit), str(max(c.ttl_s, math.ceil(ttl_s) + 1, 1))]
        keys = self._hz(ceilings)
        raw = await self._call(lambda: self._reserve(keys=keys, args=args))
        ok, idx, *fill_list = (int(x) for x in raw)
        fills = {c.key: f for c, f in zip(ceilings, fill_list, strict=True)}
        if not ok:
            failed = ceilings[idx - 1]
            return ReserveResult(False, None, failed, fills[failed.key], fills)
        after = {k: v + amount for k, v in fills.items()}
        return ReserveResult(True, rid, None, after[fullest(ceilings, after).key], fills)

    async def usage(self, ceilings: Sequence[Ceiling], *, now: float) -> dict[str, int]:
        if not ceilings:
            return {}
        keys = self._hz(ceilings)
        raw = await self._call(lambda: self._usage(keys=keys, args=[repr(float(now))]))
        return {c.key: int(v) for c, v in zip(ceilings, raw, strict=True)}

    async def settle(
        self, reservation_id: str, ceilings: Sequence[Ceiling], actual: int, *, now: float
    ) -> None:
        if actual < 0:
            raise ValueError("actual must be >= 0")
        keys = [f"{self._p}{{b}}:d:{reservation_id}", *self._hz(ceilings)]
        args = [reservation_id, str(actual), str(SETTLE_MEMORY_S)]
        args += [str(max(c.ttl_s, 1)) for c in ceilings]
        await self._call(lambda: self._settle(keys=keys, args=args))

    async def spend(self, prefix: str = "") -> dict[str, int]:
        start = len(self._h(""))
        match = self._h(_glob_escape(prefix)) + "*"

        async def run() -> dict[str, int]:
            keys = [k async for k in self._r.scan_iter(match=match, count=1000)]
            out: dict[str, int] = {}
            for i in range(0, len(keys), _BATCH):
                batch = keys[i : i + _BATCH]
                pipe = self._r.pipeline(transaction=False)
                for k in batch:
                    pipe.hget(k, "settled")
                for k, v in zip(batch, await pipe.execute(), strict=True):
                    if v is not None and int(v):
                        out[k.decode()[start:]] = int(v)
            return out

        return await self._call(run, deadline=False)

    # -- idempotency -------------------------------------------------------
    async def idem_begin(self, key: str, body_hash: str, *, ttl_s: float, lock_s: float) -> IdemBegin:
        keys, args = [f"{self._p}{{i:{key}}}"], [body_hash, uuid.uuid4().hex, _ms(lock_s)]
        raw = await self._call(lambda: self._idem_begin(keys=keys, args=args))
        state = raw[0].decode()
        return IdemBegin(state, bytes(raw[1]) if state == "replay" else None)

    async def idem_complete(self, key: str, body_hash: str, record: bytes, *, ttl_s: float) -> None:
        keys, args = [f"{self._p}{{i:{key}}}"], [body_hash, record, _ms(ttl_s)]
        await self._call(lambda: self._idem_complete(keys=keys, args=args))

    async def idem_abort(self, key: str) -> None:
        keys = [f"{self._p}{{i:{key}}}"]
        await self._call(lambda: self._idem_abort(keys=keys))

    # -- duplicate tool calls ----------------------------------------------
    def _o(self, conversation: str, call_hash: str) -> str:
        return f"{self._p}o:{len(conversation)}:{conversation}:{call_hash}"

    async def mark_once(self, conversation: str, call_hash: str, *, ttl_s: float) -> bool:
        keys = [self._o(conversation, call_hash)]
        args = [uuid.uuid4().hex, _ms(ttl_s)]
        return bool(await self._call(lambda: self._once(keys=keys, args=args)))

    async def unmark_once(self, conversation: str, call_hash: str) -> None:
        key = self._o(conversation, call_hash)
        await self._call(lambda: self._r.delete(key))

    # -- approvals ---------------------------------------------------------
    async def approval_create(self, a: Approval) -> None:
        keys = [self._a(f"r:{a.id}"), self._a("idx"), self._a_find_key(a.conversation, a.tool, a.args_hash)]
        keep = math.ceil(max(0.0, a.expires_at - a.created_at)) + self._retention
        args: list[str] = [a.id, repr(float(a.created_at)), str(keep)]
        for k, v in approval_fields(a).items():
            args += [k, v]
        await self._call(lambda: self._a_create(keys=keys, args=args))

    async def approval_get(self, id: str, *, now: float | None = None) -> Approval | None:
        raw = await self._call(lambda: self._r.hgetall(self._a(f"r:{id}")))
        return effective(parse_approval(raw), now) if raw else None

    async def _all_approvals(self) -> list[Approval]:
        async def run() -> list[Approval]:
            idx = self._a("idx")
            ids = await self._r.zrevrange(idx, 0, -1)
            found: list[Approval] = []
            gone: list[bytes] = []
            for i in range(0, len(ids), _BATCH):
                batch = ids[i : i + _BATCH]
                pipe = self._r.pipeline(transaction=False)
                for aid in batch:
                    pipe.hgetall(self._a(f"r:{aid.decode()}"))
                for aid, raw in zip(batch, await pipe.execute(), strict=True):
                    if raw:
                        found.append(parse_approval(raw))
                    else:
                        gone.append(aid)
            if gone:
                await self._r.zrem(idx, *gone)  # records expired after their retention
            return found

        return await self._call(run, deadline=False)

    async def approval_list(self, status: str | None, *, now: float) -> list[Approval]:
        items = [effective(a, now) for a in await self._all_approvals()]
        items.sort(key=lambda a: a.created_at, reverse=True)
        return [a for a in items if status is None or a.status == status]

    async def approval_decide(
        self, id: str, approve: bool, note: str | None, by: str | None, *, now: float
    ) -> Decided:
        args = [
            repr(float(now)),
            "approved" if approve else "rejected",
            note or "",
            "0" if note is None else "1",
            by or "",
            "0" if by is None else "1",
            uuid.uuid4().hex,
        ]
        keys = [self._a(f"r:{id}")]
        raw = await self._call(lambda: self._a_decide(keys=keys, args=args))
        if not raw:
            return Decided(None, False)
        return Decided(effective(parse_approval(raw[1]), now), bool(int(raw[0])))

    async def approval_find(
        self, conversation: str, tool: str, args_hash: str, *, now: float
    ) -> Approval | None:
        async def run() -> Approval | None:
            for aid in await self._r.zrevrange(self._a_find_key(conversation, tool, args_hash), 0, -1):
                raw = await self._r.hgetall(self._a(f"r:{aid.decode()}"))
                if raw:
                    return parse_approval(raw)
            return None

        found = await self._call(run)
        return effective(found, now) if found else None

    async def approval_consume(self, id: str, *, now: float) -> bool:
        keys, args = [self._a(f"r:{id}")], [uuid.uuid4().hex]
        return bool(await self._call(lambda: self._a_consume(keys=keys, args=args)))

    async def approval_unconsume(self, id: str, *, now: float) -> bool:
        keys, args = [self._a(f"r:{id}")], [uuid.uuid4().hex]
        return bool(await self._call(lambda: self._a_unconsume(keys=keys, args=args)))

    async def approval_counts(self, *, now: float | None = None) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(APPROVAL_STATUSES, 0)
        for a in await self._all_approvals():
            counts[effective(a, now).status] += 1
        return counts

    # -- feedback ----------------------------------------------------------
    async def feedback_set(self, decision_id: str, outcome: str, by: str, *, ttl_s: float) -> str | None:
        # one key per decision: any slot in a cluster, and the script touches nothing else
        keys = [f"{self._p}f:{decision_id}"]
        args = [uuid.uuid4().hex, outcome, by, _ms(ttl_s)]
        prev = await self._call(lambda: self._feedback(keys=keys, args=args))
        return None if prev is None else bytes(prev).decode()

    # -- lifecycle ---------------------------------------------------------
    async def ping(self) -> bool:
        try:
            return bool(await self._call(self._r.ping))
        except Exception:
            return False

    async def close(self) -> None:
        await self._r.aclose()
        for close in self._closers:
            await close()

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "redis",
            "mode": self._mode,
            "target": self._target,
            "prefix": self._p,
            "state": self._breaker.state,
            "circuit": self._breaker.state,
            "consecutive_failures": self._breaker.consecutive_failures,
            "circuit_trips": self._breaker.trips,
            "timeout_s": self._timeout_s,
        }


def deadline_s(timeout_s: float, retries: int) -> float:
    """Hard bound on one call: every attempt's timeout plus the backoff pauses."""
    return (retries + 1) * timeout_s + backoff(timeout_s).compute(retries)


def _pool_exhausted(e: BaseException) -> bool:
    return isinstance(e, rexc.MaxConnectionsError) or (
        type(e) is rexc.ConnectionError and str(e) == "No connection available."
    )
