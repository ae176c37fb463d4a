"""The memory store keeps no state for refused reservations and holds at most ``max_entries`` entries.

Store-level tests drive :class:`MemoryStore` directly (a fake clock for the retention TTLs); live tests
drive the real ``guardproxy serve``, read the store's own report from ``/readyz`` (``store`` is
``store.describe()``) and use ``store_max_entries`` from the config.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import yaml
from conftest import ADMIN_KEY, Mock, Proxy, default_config, free_port
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.stores import Approval, Ceiling, MemoryStore, StoreUnavailable, open_store

pytestmark = pytest.mark.anyio
NOW = 1_764_000_000.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def ceil(key: str, limit: int, ttl_s: int = 3600) -> Ceiling:
    return Ceiling(key=key, limit=limit, ttl_s=ttl_s, scope=key.split(":")[0], window="day", reset_at=None)


def approval(aid: str, created: float = NOW) -> Approval:
    return Approval(id=aid, principal="k", team="t", conversation="c", tool="refund", args_hash="h", rule_id="r",
                    reason="why", created_at=created, expires_at=created + 600)


# -- refused reservations change nothing ---------------------------------------------------------------------
async def test_refused_reservation_creates_no_window() -> None:
    s = MemoryStore()
    key, conv = ceil("key:k:day:1", 1000), ceil("conversation:k/c1", 10)
    refused = await s.reserve([key, conv], 50, now=NOW)  # fits the key, not the conversation
    assert not refused.ok and refused.failed == conv
    assert refused.fills == {key.key: 0, conv.key: 0}
    assert s.describe()["windows"] == 0
    assert s.describe()["entries"] == 0
    assert (await s.reserve([key], 50, now=NOW)).ok
    for i in range(50):  # fresh conversations, each refused: still only the key's window
        assert not (await s.reserve([key, ceil(f"conversation:k/x{i}", 10)], 50, now=NOW)).ok
    assert s.describe()["windows"] == 1
    assert await s.usage([key], now=NOW) == {key.key: 50}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sets(st.integers(0, 5), min_size=1), st.integers(0, 40)), max_size=25))
def test_windows_exist_only_for_ceilings_with_an_admitted_reservation(plan: list[tuple[set[int], int]]) -> None:
    import asyncio

    async def run() -> None:
        s = MemoryStore()
        admitted: set[str] = set()
        for keys, amount in plan:
            cs = [ceil(f"key:k{i}:day:1", 10 * (i + 1)) for i in sorted(keys)]
            before = s.describe()["windows"]
            res = await s.reserve(cs, amount, now=NOW)
            if res.ok:
                admitted |= {c.key for c in cs}
            else:
                assert s.describe()["windows"] == before  # a refusal changes nothing
            assert s.describe()["windows"] == len(admitted)

    asyncio.run(run())


# -- the bound -----------------------------------------------------------------------------------------------
async def test_full_store_refuses_new_entries_and_keeps_live_ones() -> None:
    clock = Clock()
    s = MemoryStore(max_entries=5, clock=clock)
    budget = [ceil("key:b:day:1", 1000), ceil("team:b:day:1", 1000)]
    r = await s.reserve(budget, 100, now=NOW)
    assert r.ok and r.reservation_id
    assert await s.mark_once("conv", "a", ttl_s=600)
    assert (await s.idem_begin("idem-1", "h", ttl_s=600, lock_s=30)).state == "new"
    await s.approval_create(approval("apr_1"))
    assert s.describe()["entries"] == 5 and s.describe()["max_entries"] == 5

    for write in (lambda: s.mark_once("conv", "b", ttl_s=600),
                  lambda: s.idem_begin("idem-2", "h", ttl_s=600, lock_s=30),
                  lambda: s.approval_create(approval("apr_2")),
                  lambda: s.feedback_set("dec-1", "confirmed", "k", ttl_s=600),
                  lambda: s.reserve([*budget, ceil("conversation:b/new", 1000)], 1, now=NOW)):
        with pytest.raises(StoreUnavailable, match="full"):
            await write()
    d = s.describe()
    assert (d["entries"], d["windows"], d["once_markers"], d["idempotency_keys"], d["approvals"], d["feedback"]) \
        == (5, 2, 1, 1, 1, 0)
    # nothing live was evicted, and writes that need no new entry still work
    assert await s.usage(budget, now=NOW) == {budget[0].key: 100, budget[1].key: 100}
    assert (await s.reserve(budget, 100, now=NOW)).ok
    await s.settle(r.reservation_id, budget, 80, now=NOW)
    assert await s.spend("key:b:") == {budget[0].key: 80}
    assert await s.mark_once("conv", "a", ttl_s=600) is False
    assert (await s.idem_begin("idem-1", "h", ttl_s=600, lock_s=30)).state == "in_flight"
    await s.idem_complete("idem-1", "h", b"{}", ttl_s=600)
    assert (await s.approval_decide("apr_1", True, None, "admin", now=NOW + 1)).changed
    assert s.describe()["entries"] == 5


async def test_full_store_makes_room_from_expired_entries_only() -> None:
    clock = Clock()
    s = MemoryStore(max_entries=3, clock=clock)
    assert await s.mark_once("conv", "short", ttl_s=10)
    assert await s.mark_once("conv", "long", ttl_s=1000)
    assert await s.feedback_set("dec-1", "confirmed", "k", ttl_s=1000) is None
    with pytest.raises(StoreUnavailable):
        await s.mark_once("conv", "next", ttl_s=1000)
    clock.t += 11  # "short" has expired: the full store drops it to make room
    assert await s.mark_once("conv", "next", ttl_s=1000)
    assert s.describe()["entries"] == 3
    with pytest.raises(StoreUnavailable):
        await s.feedback_set("dec-2", "confirmed", "k", ttl_s=1000)
    assert await s.mark_once("conv", "long", ttl_s=1000) is False  # the live ones are all still there
    assert await s.feedback_set("dec-1", "overridden", "k", ttl_s=1000) == "confirmed"


async def test_store_at_its_bound_keeps_serving_short_lived_entries() -> None:
    clock = Clock()
    s = MemoryStore(max_entries=100, clock=clock)
    for i in range(5000):  # a steady stream, each marker living 1 s, 0.02 s apart: ~50 live at any time
        assert await s.mark_once("conv", f"call-{i}", ttl_s=1.0)
        clock.t += 0.02
        assert s.describe()["entries"] <= 100


async def test_settle_is_never_refused_and_settled_ids_are_capped() -> None:
    s = MemoryStore(max_entries=2)
    a, b, c = ceil("key:s:day:1", 1000), ceil("team:s:day:1", 1000), ceil("conversation:s/1", 1000)
    r = await s.reserve([a, b], 100, now=NOW)
    assert r.ok and r.reservation_id
    # the reservation's conversation window is gone (e.g. expired); settling still charges it
    await s.settle(r.reservation_id, [a, b, c], 70, now=NOW)
    assert await s.usage([a, b, c], now=NOW) == {a.key: 70, b.key: 70, c.key: 70}
    assert s.describe()["entries"] == 3  # over the bound by the charged window, which is not lost
    assert (await s.reserve([a, b, c], 10, now=NOW)).ok  # needs no new entry: still admitted
    with pytest.raises(StoreUnavailable):
        await s.mark_once("conv", "x", ttl_s=60)
    for rid in ("r1", "r2", "r3"):
        await s.settle(rid, [a], 1, now=NOW)
    assert s.describe()["settled_ids"] == 2  # oldest forgotten first, never more than max_entries


async def test_release_creates_no_window() -> None:
    s = MemoryStore()
    cs = [ceil("key:rel:day:1", 1000), ceil("conversation:rel/1", 1000)]
    await s.release("never-reserved", cs, now=NOW)
    assert s.describe()["windows"] == 0
    r = await s.reserve(cs[:1], 100, now=NOW)
    assert r.ok and r.reservation_id
    await s.release(r.reservation_id, cs, now=NOW)  # the conversation window never existed: still none
    assert s.describe()["windows"] == 1
    assert await s.usage(cs, now=NOW) == {cs[0].key: 0, cs[1].key: 0}


async def test_open_store_passes_the_bound_to_the_memory_store() -> None:
    s = open_store("memory", max_entries=7)
    assert isinstance(s, MemoryStore)
    assert (s.describe()["entries"], s.describe()["max_entries"]) == (0, 7)
    assert MemoryStore().describe()["max_entries"] == 1_000_000


# -- live ----------------------------------------------------------------------------------------------------
RUN = uuid.uuid4().hex[:8]
TIGHT_ID, TIGHT_KEY = f"bounds-tight-{RUN}", "sk-bounds-tight"
OPEN_ID, OPEN_KEY = f"bounds-open-{RUN}", "sk-bounds-open"
CONV = "x-guardproxy-conversation-id"


def _policies() -> dict[str, str]:
    def policy(name: str, key_id: str, **extra: Any) -> str:
        return yaml.safe_dump({"apiVersion": "guardproxy/v1", "kind": "Policy", "metadata": {"name": name},
                               "match": {"keys": [key_id]}, **extra})

    return {"tight.yaml": policy("tight", TIGHT_ID, cost={"per_conversation_usd": 0.000001}),
            "open.yaml": policy("open", OPEN_ID)}


def _config(mock: Mock, **extra: Any) -> dict[str, Any]:
    cfg = default_config(mock.url, free_port())
    cfg["keys"] = [{"id": TIGHT_ID, "key": TIGHT_KEY}, {"id": OPEN_ID, "key": OPEN_KEY}]
    return {**cfg, **extra}


def _store(p: Proxy) -> dict[str, Any]:
    doc: dict[str, Any] = p.get("/readyz", key=None).json()["store"]
    return doc


def _ask(p: Proxy, key: str, conversation: str) -> httpx.Response:
    return p.post("/v1/chat/completions", key=key, headers={CONV: conversation},
                  json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]})


def test_refused_requests_leave_no_budget_windows(make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> None:
    p = make_proxy(policies=_policies(), config=_config(mock_upstream))
    mock_upstream.reset()
    before = _store(p)
    assert before["backend"] == "memory"
    for _ in range(20):  # every request a fresh conversation, each over its tiny conversation budget
        resp = _ask(p, TIGHT_KEY, f"conv-{uuid.uuid4().hex}")
        assert resp.status_code == 429, resp.text
        assert resp.json()["error"]["code"] == "budget_exceeded"
    after = _store(p)
    assert after["windows"] == before["windows"]
    assert after["entries"] == before["entries"]
    assert mock_upstream.calls() == []


def test_memory_store_bound_through_the_server(make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> None:
    # Needs proxy/app.py build_state to pass config.store_max_entries to open_store.
    p = make_proxy(policies=_policies(), config=_config(mock_upstream, store_max_entries=8))
    assert _store(p)["max_entries"] == 8
    mock_upstream.reset()
    served: list[str] = []
    refused = None
    for _ in range(20):  # each new conversation needs a new budget window: the bound is reached soon
        conv = f"conv-{uuid.uuid4().hex}"
        mock_upstream.script({"content": "ok", "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
        resp = _ask(p, OPEN_KEY, conv)
        if resp.status_code != 200:
            refused = resp
            break
        served.append(conv)
    assert served and refused is not None, "the bound was never reached"
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "state_unavailable", refused.text
    report = _store(p)
    assert report["entries"] <= report["max_entries"] == 8
    # live budget data was not evicted to make room: every served conversation is still counted
    spend = p.get(f"/v1/spend?prefix=conversation:{OPEN_ID}/", key=ADMIN_KEY).json()["data"]
    assert {row["counter"] for row in spend} == {f"conversation:{OPEN_ID}/{c}" for c in served}
    # and a conversation that already has its window is still served
    mock_upstream.script({"content": "again", "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    assert _ask(p, OPEN_KEY, served[0]).status_code == 200
