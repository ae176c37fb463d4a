"""State stores: one suite, run against every backend.

Backends: ``memory``; the shared Redis (db 15, unique key prefix per test); a private
single-node Redis Cluster (proves every script keeps its keys in one slot: the
client and server both reject CROSSSLOT); a private Sentinel-managed Redis.
Private servers are ``redis-server`` subprocesses stopped at module teardown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from proxy.stores import Approval, Ceiling, Decided, MemoryStore, Store, StoreUnavailable, open_store
from proxy.stores._breaker import CircuitBreaker
from proxy.stores.redis import RedisStore

pytestmark = pytest.mark.anyio
SHARED = "redis://127.0.0.1:6379/15"
HAVE_SERVER = shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _free_port(below: int) -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < below:
            return port
    raise RuntimeError(f"no free port below {below}")


class RedisServer:
    """A private ``redis-server`` subprocess (stop/start keeps the port)."""

    def __init__(self, *extra: str, conf: str | None = None) -> None:
        # a cluster node also listens on port + 10000 (its bus), which must stay a valid port
        self.below = 55_000 if "--cluster-enabled" in extra else 65_536
        self.port = _free_port(self.below)
        self.dir = tempfile.mkdtemp(prefix="gp-redis-")
        self.extra = extra
        self.conf = conf
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, same_port: bool = False) -> None:
        """Start; a first start moves to a fresh port if another process took this one."""
        for _ in range(3):
            try:
                return self._start()
            except RuntimeError:
                self.stop()
                if same_port:
                    raise
                self.port = _free_port(self.below)
        self._start()

    def _start(self) -> None:
        args = ["redis-server"]
        if self.conf is not None:
            path = Path(self.dir, "redis.conf")
            path.write_text(f"port {self.port}\n{self.conf}")
            args.append(str(path))
        args += ["--port", str(self.port), "--dir", self.dir, "--save", "", "--appendonly", "no", *self.extra]
        with open(Path(self.dir, "log"), "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self.cli_until("PING", b"PONG")

    def cli(self, *cmd: str) -> bytes:
        return subprocess.run(
            ["redis-cli", "-p", str(self.port), *cmd], capture_output=True, timeout=5, check=False
        ).stdout

    def cli_until(self, cmd: str, expect: bytes) -> None:
        deadline = time.monotonic() + 10
        while expect not in self.cli(*cmd.split()):
            if time.monotonic() > deadline or (self.proc is not None and self.proc.poll() is not None):
                log = Path(self.dir, "log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on {self.port}: {cmd} never gave {expect!r}\n{log}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    if not HAVE_SERVER:
        pytest.skip("redis-server not installed")
    srv = RedisServer("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
    try:
        srv.start()
        srv.cli("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        srv.cli_until("CLUSTER INFO", b"cluster_state:ok")
        yield f"redis+cluster://127.0.0.1:{srv.port}"
    finally:
        srv.close()


@pytest.fixture(scope="module")
def sentinel_url() -> Iterator[str]:
    if not HAVE_SERVER:
        pytest.skip("redis-server not installed")
    master = RedisServer()
    sentinel: RedisServer | None = None
    try:
        master.start()
        sentinel = RedisServer("--sentinel", conf=f"sentinel monitor gpmaster 127.0.0.1 {master.port} 1\n")
        sentinel.start()
        sentinel.cli_until("SENTINEL get-master-addr-by-name gpmaster", str(master.port).encode())
        yield f"redis+sentinel://127.0.0.1:{sentinel.port}/gpmaster/0"
    finally:
        if sentinel is not None:
            sentinel.close()
        master.close()


async def _drop_prefix(client: aioredis.Redis | aioredis.RedisCluster, prefix: str) -> None:
    keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
    for k in keys:
        await client.delete(k)


@pytest.fixture(params=["memory", "redis", "cluster", "sentinel"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    url: str = SHARED if request.param == "redis" else request.getfixturevalue(f"{request.param}_url")
    prefix = f"gptest{uuid.uuid4().hex[:10]}:"
    s = RedisStore.from_url(url, prefix=prefix, timeout_s=1.0)
    yield s
    await _drop_prefix(s._r, prefix)
    await s.close()


def ceil(key: str, limit: int, ttl_s: int = 3600) -> Ceiling:
    return Ceiling(key=key, limit=limit, ttl_s=ttl_s, scope=key.split(":")[0], window="day", reset_at=None)


NOW = 1_764_000_000.0


# -- budgets ---------------------------------------------------------------
async def test_reserve_is_all_or_nothing_across_three_ceilings(store: Store) -> None:
    key, team, glob = ceil("key:k1:day:1", 1000), ceil("team:t1:day:1", 500), ceil("global:day:1", 10_000)
    cs = [key, team, glob]
    assert (await store.reserve([key], 300, now=NOW)).ok
    first = await store.reserve(cs, 100, now=NOW)
    assert first.ok and first.reservation_id and first.failed is None
    assert first.fills == {key.key: 300, team.key: 0, glob.key: 0}
    assert first.spent == 400  # fullest after the hold: key at 400/1000

    refused = await store.reserve(cs, 450, now=NOW)  # fits key (850) and global, not team (550)
    assert not refused.ok and refused.reservation_id is None
    assert refused.failed == team and refused.spent == 100
    assert refused.fills == {key.key: 400, team.key: 100, glob.key: 100}
    assert await store.usage(cs, now=NOW) == {key.key: 400, team.key: 100, glob.key: 100}

    assert (await store.reserve(cs, 400, now=NOW)).ok  # exactly at the team limit is allowed
    assert await store.usage(cs, now=NOW) == {key.key: 800, team.key: 500, glob.key: 500}


async def test_fifty_concurrent_reservations_admit_exactly_ten(store: Store) -> None:
    cs = [ceil("key:conc:day:1", 1_000_000), ceil("global:conc:day:1", 50_000_000)]
    results = await asyncio.gather(*(store.reserve(cs, 100_000, now=NOW) for _ in range(50)))
    admitted = [r for r in results if r.ok]
    assert len(admitted) == 10
    assert all(r.failed == cs[0] for r in results if not r.ok)
    await asyncio.gather(*(store.settle(r.reservation_id or "", cs, 90_000, now=NOW) for r in admitted))
    assert await store.spend("key:conc:") == {"key:conc:day:1": 900_000}
    assert await store.usage(cs, now=NOW) == {cs[0].key: 900_000, cs[1].key: 900_000}


async def test_settle_is_idempotent_and_release_frees(store: Store) -> None:
    cs = [ceil("key:idem:day:1", 1000)]
    r = await store.reserve(cs, 300, now=NOW)
    assert r.reservation_id
    await asyncio.gather(*(store.settle(r.reservation_id, cs, 250, now=NOW) for _ in range(3)))
    await store.settle(r.reservation_id, cs, 250, now=NOW)
    assert await store.usage(cs, now=NOW) == {cs[0].key: 250}
    held = await store.reserve(cs, 700, now=NOW)
    assert held.ok and held.reservation_id
    await store.release(held.reservation_id, cs, now=NOW)
    assert await store.usage(cs, now=NOW) == {cs[0].key: 250}
    assert await store.spend("key:idem:") == {cs[0].key: 250}


async def test_settling_an_unknown_reservation_still_charges(store: Store) -> None:
    cs = [ceil("key:lost:day:1", 1000), ceil("team:lost:day:1", 1000)]
    await store.settle("never-reserved", cs, 30, now=NOW)
    assert await store.usage(cs, now=NOW) == {cs[0].key: 30, cs[1].key: 30}


async def test_expired_reservation_stops_counting(store: Store) -> None:
    cs = [ceil("key:exp:day:1", 1000)]
    stale = await store.reserve(cs, 600, now=NOW, ttl_s=60)
    zero = await store.reserve(cs, 0, now=NOW, ttl_s=60)  # a 0 hold must clean up too
    assert stale.ok and zero.ok and stale.reservation_id
    assert not (await store.reserve(cs, 600, now=NOW + 30)).ok
    assert await store.usage(cs, now=NOW + 60) == {cs[0].key: 0}
    fresh = await store.reserve(cs, 600, now=NOW + 61)
    assert fresh.ok
    # settling the expired hold charges its actual cost once and frees nothing twice
    await store.settle(stale.reservation_id, cs, 500, now=NOW + 62)
    assert await store.usage(cs, now=NOW + 62) == {cs[0].key: 1100}


async def test_spend_filters_by_prefix(store: Store) -> None:
    a, b = ceil("key:sp*x:day:1", 10**12), ceil("team:sp:day:1", 10**12)
    big = 2**52  # exact in Lua doubles; written as a string so HINCRBY stays integer
    await store.settle("r1", [a, b], 7, now=NOW)
    await store.settle("r2", [b], big, now=NOW)
    assert await store.spend("key:sp*") == {a.key: 7}
    assert await store.spend("team:sp:") == {b.key: big + 7}
    assert (await store.spend()).keys() >= {a.key, b.key}


# -- idempotency -------------------------------------------------------------
async def test_idempotency_states(store: Store) -> None:
    k = f"idem-{uuid.uuid4().hex}"
    assert (await store.idem_begin(k, "h1", ttl_s=86400, lock_s=30)).state == "new"
    assert (await store.idem_begin(k, "h1", ttl_s=86400, lock_s=30)).state == "in_flight"
    assert (await store.idem_begin(k, "h2", ttl_s=86400, lock_s=30)).state == "mismatch"
    await store.idem_abort(k)
    assert (await store.idem_begin(k, "h1", ttl_s=86400, lock_s=30)).state == "new"
    record = b'{"id":"chatcmpl-1"}\x00\xff'
    await store.idem_complete(k, "h1", record, ttl_s=86400)
    replay = await store.idem_begin(k, "h1", ttl_s=86400, lock_s=30)
    assert replay.state == "replay" and replay.record == record
    assert (await store.idem_begin(k, "h2", ttl_s=86400, lock_s=30)).state == "mismatch"
    await store.idem_abort(k)  # a completed record is not dropped by abort
    assert (await store.idem_begin(k, "h1", ttl_s=86400, lock_s=30)).state == "replay"


async def test_in_flight_marker_expires_after_lock(store: Store) -> None:
    k = f"idem-{uuid.uuid4().hex}"
    assert (await store.idem_begin(k, "h", ttl_s=86400, lock_s=0.15)).state == "new"
    await asyncio.sleep(0.3)  # lets the lock lapse; nothing about timing is asserted
    assert (await store.idem_begin(k, "h", ttl_s=86400, lock_s=30)).state == "new"


async def test_concurrent_idem_begin_has_one_owner(store: Store) -> None:
    k = f"idem-{uuid.uuid4().hex}"
    states = await asyncio.gather(*(store.idem_begin(k, "h", ttl_s=60, lock_s=30) for _ in range(20)))
    assert [s.state for s in states].count("new") == 1
    assert {s.state for s in states} == {"new", "in_flight"}


# -- once per conversation -----------------------------------------------------
async def test_mark_once(store: Store) -> None:
    conv = f"conv-{uuid.uuid4().hex}"
    firsts = await asyncio.gather(*(store.mark_once(conv, "call-a", ttl_s=600) for _ in range(20)))
    assert firsts.count(True) == 1
    assert await store.mark_once(conv, "call-a", ttl_s=600) is False
    assert await store.mark_once(conv, "call-b", ttl_s=600) is True
    assert await store.mark_once(conv + "x", "call-a", ttl_s=600) is True


# -- approvals -----------------------------------------------------------------
def approval(aid: str, conv: str, created: float, expires_in: float = 600) -> Approval:
    return Approval(
        id=aid, principal="key-1", team="support", conversation=conv, tool="refund",
        args_hash="ah1", rule_id="refund-over-100", reason="refund above $100",
        created_at=created, expires_at=created + expires_in, status="pending",
    )  # fmt: skip


async def test_approval_lifecycle_and_single_consume(store: Store) -> None:
    conv = f"conv-{uuid.uuid4().hex}"
    old, new = approval(f"a-{uuid.uuid4().hex}", conv, NOW), approval(f"b-{uuid.uuid4().hex}", conv, NOW + 5)
    await store.approval_create(old)
    await store.approval_create(new)
    await store.approval_create(approval(new.id, conv, NOW + 9))  # same id again: no overwrite
    assert await store.approval_get(old.id) == old
    assert await store.approval_get("missing") is None
    assert [a.id for a in await store.approval_list("pending", now=NOW + 10)] == [new.id, old.id]
    assert (await store.approval_find(conv, "refund", "ah1", now=NOW + 10)) == new
    assert await store.approval_find(conv, "refund", "other", now=NOW + 10) is None

    assert not await store.approval_consume(new.id, now=NOW + 10)  # still pending
    first = await store.approval_decide(new.id, True, "ok for VIP", "alice", now=NOW + 20)
    decided = first.approval
    assert first.changed and decided is not None and decided.status == "approved"
    assert (decided.note, decided.decided_by, decided.decided_at) == ("ok for VIP", "alice", NOW + 20)
    again = await store.approval_decide(new.id, False, "no", "bob", now=NOW + 21)
    assert again == Decided(decided, False)  # only pending can be decided
    assert await store.approval_decide("missing", True, None, None, now=NOW) == Decided(None, False)

    wins = await asyncio.gather(*(store.approval_consume(new.id, now=NOW + 30) for _ in range(20)))
    assert wins.count(True) == 1
    assert (await store.approval_get(new.id)) == dataclasses.replace(decided, status="used")
    rejected = (await store.approval_decide(old.id, False, None, "bob", now=NOW + 40)).approval
    assert rejected is not None and rejected.status == "rejected" and rejected.note is None
    assert not await store.approval_consume(old.id, now=NOW + 41)
    counts = await store.approval_counts(now=NOW + 50)
    assert (counts["used"], counts["rejected"], counts["pending"]) == (1, 1, 0)


async def test_pending_approval_expires(store: Store) -> None:
    a = approval(f"e-{uuid.uuid4().hex}", f"conv-{uuid.uuid4().hex}", NOW, expires_in=60)
    await store.approval_create(a)
    assert (await store.approval_get(a.id, now=NOW + 59)) == a
    assert [x.status for x in await store.approval_list(None, now=NOW + 60) if x.id == a.id] == ["expired"]
    assert [x.id for x in await store.approval_list("pending", now=NOW + 60)] == []
    late = await store.approval_decide(a.id, True, None, "alice", now=NOW + 61)
    assert not late.changed and late.approval is not None
    assert late.approval.status == "expired" and late.approval.decided_by is None
    assert not await store.approval_consume(a.id, now=NOW + 62)
    found = await store.approval_find(a.conversation, a.tool, a.args_hash, now=NOW + 61)
    assert found is not None and found.status == "expired"
    assert (await store.approval_counts(now=NOW + 61))["expired"] == 1


async def test_concurrent_decides_have_exactly_one_winner(store: Store) -> None:
    conv = f"conv-{uuid.uuid4().hex}"
    for approve in (True, False):
        a = approval(f"w-{uuid.uuid4().hex}", conv, NOW)
        await store.approval_create(a)
        outs = await asyncio.gather(*(store.approval_decide(a.id, approve, None, f"r{i}", now=NOW + 1)
                                      for i in range(10)))
        winners = [d for d in outs if d.changed]
        assert len(winners) == 1
        status = "approved" if approve else "rejected"
        assert all(d.approval is not None and d.approval.status == status for d in outs)
        won = winners[0].approval
        assert won is not None
        # every loser sees the winner's decision, not its own
        assert {d.approval.decided_by for d in outs if d.approval is not None} == {won.decided_by}
        # deciding again the same way, or the other way, changes nothing
        for again in (approve, not approve):
            assert await store.approval_decide(a.id, again, "late", "late", now=NOW + 2) == Decided(won, False)


async def test_approval_unconsume_gives_back_only_a_used_approval(store: Store) -> None:
    conv = f"conv-{uuid.uuid4().hex}"
    a = approval(f"u-{uuid.uuid4().hex}", conv, NOW)
    await store.approval_create(a)
    assert not await store.approval_unconsume(a.id, now=NOW + 1)  # pending stays pending
    assert (await store.approval_get(a.id)) == a
    decided = (await store.approval_decide(a.id, True, None, "alice", now=NOW + 2)).approval
    assert decided is not None
    assert not await store.approval_unconsume(a.id, now=NOW + 3)  # approved, not used: nothing to give back
    assert await store.approval_consume(a.id, now=NOW + 4)
    backs = await asyncio.gather(*(store.approval_unconsume(a.id, now=NOW + 5) for _ in range(10)))
    assert backs.count(True) == 1  # one use given back, once
    assert (await store.approval_get(a.id)) == decided
    assert await store.approval_consume(a.id, now=NOW + 6)  # usable exactly once more
    assert not await store.approval_consume(a.id, now=NOW + 7)
    assert (await store.approval_get(a.id)) == dataclasses.replace(decided, status="used")

    r = approval(f"r-{uuid.uuid4().hex}", conv, NOW)
    await store.approval_create(r)
    await store.approval_decide(r.id, False, None, "bob", now=NOW + 1)
    assert not await store.approval_unconsume(r.id, now=NOW + 2)  # rejected stays rejected
    still = await store.approval_get(r.id, now=NOW + 2)
    assert still is not None and still.status == "rejected"
    assert not await store.approval_unconsume("missing", now=NOW)


async def test_unmark_once_forgets_the_marker(store: Store) -> None:
    conv = f"conv-{uuid.uuid4().hex}"
    assert await store.mark_once(conv, "call-a", ttl_s=600)
    assert await store.mark_once(conv, "call-b", ttl_s=600)
    await store.unmark_once(conv, "call-a")
    firsts = await asyncio.gather(*(store.mark_once(conv, "call-a", ttl_s=600) for _ in range(10)))
    assert firsts.count(True) == 1  # forgotten, then marked again exactly once
    assert await store.mark_once(conv, "call-b", ttl_s=600) is False  # other markers are untouched
    await store.unmark_once(conv, "never-marked")  # forgetting nothing is fine
    await store.unmark_once(conv + "x", "call-a")
    assert await store.mark_once(conv, "call-a", ttl_s=600) is False


async def test_feedback_set_returns_the_previous_verdict(store: Store) -> None:
    did = f"dec-{uuid.uuid4().hex}"
    assert await store.feedback_set(did, "overridden", "key-1", ttl_s=600) is None
    assert await store.feedback_set(did, "confirmed", "key-1", ttl_s=600) == "overridden"
    assert await store.feedback_set(did, "confirmed", "admin", ttl_s=600) == "confirmed"
    assert await store.feedback_set(f"dec-{uuid.uuid4().hex}", "confirmed", "key-1", ttl_s=600) is None


async def test_concurrent_feedback_sets_form_one_chain(store: Store) -> None:
    did = f"dec-{uuid.uuid4().hex}"
    outcomes = [f"o{i}" for i in range(12)]
    prevs = await asyncio.gather(*(store.feedback_set(did, o, "k", ttl_s=600) for o in outcomes))
    last = await store.feedback_set(did, "final", "k", ttl_s=600)
    # one call was first; every other call saw exactly one earlier verdict, each replaced once
    assert prevs.count(None) == 1
    assert sorted([p for p in prevs if p is not None] + [last]) == sorted(outcomes)


async def test_feedback_verdict_expires(store: Store) -> None:
    did = f"dec-{uuid.uuid4().hex}"
    assert await store.feedback_set(did, "overridden", "k", ttl_s=0.15) is None
    await asyncio.sleep(0.3)  # lets the verdict lapse; nothing about timing is asserted
    assert await store.feedback_set(did, "confirmed", "k", ttl_s=600) is None


async def test_redis_resent_scripts_answer_what_the_first_attempt_did() -> None:
    # The client re-sends a script whose reply was lost (timeout, reconnect): the per-call token makes the
    # second run report the first run's outcome instead of applying again or reporting a loss.
    prefix = f"gptest{uuid.uuid4().hex[:10]}:"
    s = RedisStore.from_url(SHARED, prefix=prefix, timeout_s=1.0)
    try:
        a = approval(f"t-{uuid.uuid4().hex}", f"conv-{uuid.uuid4().hex}", NOW)
        await s.approval_create(a)
        rec = [s._a(f"r:{a.id}")]
        decide = [repr(NOW + 1), "approved", "", "0", "alice", "1", "tok-1"]
        assert [int(x[0]) for x in [await s._a_decide(keys=rec, args=decide) for _ in range(2)]] == [1, 1]
        assert int((await s._a_decide(keys=rec, args=[*decide[:6], "tok-2"]))[0]) == 0  # another caller lost

        assert await s.approval_consume(a.id, now=NOW + 2)
        assert await s._a_unconsume(keys=rec, args=["u-1"]) == 1
        assert await s.approval_consume(a.id, now=NOW + 3)  # used again before the re-sent unconsume lands
        assert await s._a_unconsume(keys=rec, args=["u-1"]) == 1
        got = await s.approval_get(a.id)
        assert got is not None and got.status == "used"  # one use given back, not two

        fk = [f"{prefix}f:dec-{uuid.uuid4().hex}"]
        assert await s._feedback(keys=fk, args=["f-1", "overridden", "k", "60000"]) is None
        assert await s._feedback(keys=fk, args=["f-2", "confirmed", "k", "60000"]) == b"overridden"
        assert await s._feedback(keys=fk, args=["f-2", "confirmed", "k", "60000"]) == b"overridden"
    finally:
        await _drop_prefix(s._r, prefix)
        await s.close()


async def test_ping_and_describe(store: Store) -> None:
    assert await store.ping() is True
    assert store.describe()["backend"] in ("memory", "redis")


# -- Redis outage, recovery, secrets --------------------------------------------
async def test_dead_redis_raises_store_unavailable_and_opens_circuit() -> None:
    s = RedisStore.from_url("redis://:s3cretpw@127.0.0.1:1/15", timeout_s=0.1)
    cs = [ceil("key:dead:day:1", 100)]
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: s.reserve(cs, 1, now=NOW),
        lambda: s.settle("r", cs, 1, now=NOW),
        lambda: s.idem_begin("k", "h", ttl_s=60, lock_s=5),
        lambda: s.mark_once("c", "h", ttl_s=60),
        lambda: s.approval_get("a"),
    ]
    for call in calls:
        with pytest.raises(StoreUnavailable) as exc:
            await call()
        assert "s3cretpw" not in str(exc.value)
    assert s.describe()["circuit"] == "open"
    with pytest.raises(StoreUnavailable, match="circuit open"):
        await s.usage(cs, now=NOW)
    assert await s.ping() is False
    assert "s3cretpw" not in repr(s.describe())
    await s.close()


@pytest.mark.skipif(not HAVE_SERVER, reason="redis-server not installed")
async def test_call_after_redis_comes_back_succeeds() -> None:
    srv = RedisServer()
    try:
        srv.start()
    except RuntimeError:
        srv.close()
        raise
    s = RedisStore.from_url(f"redis://127.0.0.1:{srv.port}/0", timeout_s=0.5)
    cs = [ceil("key:back:day:1", 100)]
    try:
        assert (await s.reserve(cs, 10, now=NOW)).ok  # pool now holds a connection
        srv.stop()
        with pytest.raises(StoreUnavailable):
            await s.reserve(cs, 10, now=NOW)
        srv.start(same_port=True)
        assert (await s.reserve(cs, 10, now=NOW)).ok
        assert s.describe()["circuit"] == "closed"
    finally:
        await s.close()
        srv.close()


def test_circuit_breaker_half_open() -> None:
    t = [0.0]
    b = CircuitBreaker(threshold=2, reset_s=1.0, clock=lambda: t[0])

    def seen() -> tuple[str, bool]:
        return b.state, b.allow()

    b.failure()
    assert seen() == ("closed", True)
    b.failure()
    assert seen() == ("open", False)
    t[0] = 1.0
    assert seen() == ("half_open", True)
    b.failure()  # a failed probe re-opens at once
    assert seen() == ("open", False)
    t[0] = 2.5
    b.success()
    assert (*seen(), b.consecutive_failures, b.trips) == ("closed", True, 0, 2)


@pytest.mark.parametrize(
    ("url", "mode"),
    [
        ("redis://:s3cretpw@127.0.0.1:6379/15", "standalone"),
        ("redis://user:s3cretpw@127.0.0.1:6379/15?password=s3cretpw", "standalone"),
        ("rediss://:s3cretpw@127.0.0.1:6380/0", "standalone"),
        ("redis+sentinel://:s3cretpw@127.0.0.1:26379,127.0.0.1:26380/mymaster/2", "sentinel"),
        ("redis+cluster://:s3cretpw@127.0.0.1:7000,127.0.0.1:7001", "cluster"),
    ],
)
async def test_open_store_modes_and_describe_hides_password(url: str, mode: str) -> None:
    s = open_store(url)
    d = s.describe()
    assert (d["backend"], d["mode"]) == ("redis", mode)
    assert "s3cretpw" not in repr(d)
    await s.close()


async def test_open_store_memory_and_unknown() -> None:
    assert isinstance(open_store("memory"), MemoryStore)
    with pytest.raises(ValueError):
        open_store("ftp://127.0.0.1")
    with pytest.raises(ValueError):
        RedisStore.from_url(SHARED, prefix="bad{tag}:")
