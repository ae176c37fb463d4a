"""Live-server tests of shared state: idempotency, human approvals, shared budgets and store outages.

Idempotency and approvals run against both store backends (``memory`` and a real Redis, db 14,
with key ids unique to the run). The Redis-only tests run three ``guardproxy serve`` replicas sharing one Redis (a
budget admits exactly ten requests across all of them; an approval given on one replica is honoured
on another), a proxy whose store is a dead port (fail_closed answers 503 ``state_unavailable``,
fail_open serves and says ``x-guardproxy-degraded: true``), and ``--workers 2`` on the memory store,
which must refuse to start.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
import redis
import yaml
from conftest import ADMIN_KEY, ROOT, Mock, Proxy, default_config, free_port

REDIS14 = "redis://127.0.0.1:6379/14"
# Key ids are unique per run: counters, markers and approvals of a concurrent run of this file (another
# developer's suite on the same machine) can then never meet ours in the shared Redis db.
RUN = uuid.uuid4().hex[:8]
AGENT_ID, BUDGET_ID, OPEN_ID = f"state-agent-{RUN}", f"state-budget-{RUN}", f"state-open-{RUN}"
DEAD = "redis://127.0.0.1:1/0"
AGENT_KEY = "sk-state-agent"
BUDGET_KEY = "sk-state-budget"
OPEN_KEY = "sk-state-open"
CONV = "x-guardproxy-conversation-id"
TRANSFER = {"type": "function", "function": {"name": "transfer_funds", "parameters": {
    "type": "object", "properties": {"amount": {"type": "number"}, "to": {"type": "string"}},
    "required": ["amount", "to"]}}}
USER = [{"role": "user", "content": "move the money"}]


def _policy(name: str, key_id: str, **extra: Any) -> str:
    return yaml.safe_dump({"apiVersion": "guardproxy/v1", "kind": "Policy", "metadata": {"name": name},
                           "match": {"keys": [key_id]}, **extra})


POLICIES = {
    "agent.yaml": _policy("agent", AGENT_ID, tools={"default": "allow", "allow": {"transfer_funds": {"rules": [
        {"id": "big-transfer-needs-approval", "when": "double(args.amount) > 100.0",
         "action": "require_approval", "reason": "transfers over $100 need a human"}]}}}),
    "budget.yaml": _policy("budget", BUDGET_ID, cost={"budgets": [{"scope": "key", "window": "day", "usd": 1}]}),
    "open.yaml": _policy("open", OPEN_ID, on_store_error="fail_open",
                         tools={"default": "allow", "allow": {"transfer_funds": {"rules": [
                             {"id": "big-transfer-needs-approval", "when": "double(args.amount) > 100.0",
                              "action": "require_approval", "reason": "transfers over $100 need a human"}]}}}),
}


def _config(mock: Mock, store: str) -> dict[str, Any]:
    cfg = default_config(mock.url, free_port(), store)
    cfg["models"].append({"name": "priced-model", "upstream": "openai/priced-model", "api_base": mock.url,
                          "api_key": "sk-upstream-secret-not-for-clients",
                          "price": {"input_per_mtok": 0, "output_per_mtok": 100}})
    cfg["keys"] = [{"id": AGENT_ID, "key": AGENT_KEY}, {"id": BUDGET_ID, "key": BUDGET_KEY},
                   {"id": OPEN_ID, "key": OPEN_KEY}]
    return cfg


@pytest.fixture(scope="module")
def redis14() -> Iterator[str]:
    """db 14, checked reachable (a missing Redis is a failure, not a skip). Not flushed: ids unique per run
    keep this run's state apart, and a flush would wipe a concurrent run's pending approvals; every key the
    proxy writes carries a TTL."""
    r = redis.Redis.from_url(REDIS14)
    assert r.ping()
    yield REDIS14
    r.close()


@pytest.fixture(scope="module")
def replicas(redis14: str, make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> list[Proxy]:
    """Three ``guardproxy serve`` processes sharing one Redis, started side by side."""
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(make_proxy, policies=POLICIES, config=_config(mock_upstream, redis14))
                   for _ in range(3)]
        return [f.result() for f in futures]


@pytest.fixture(scope="module", params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> Proxy:
    """One proxy per store backend; the Redis one is the first replica (db 14, flushed first)."""
    if request.param == "memory":
        return make_proxy(policies=POLICIES, config=_config(mock_upstream, "memory"))
    proxies: list[Proxy] = request.getfixturevalue("replicas")
    return proxies[0]


@pytest.fixture(autouse=True)
def _fresh_mock(mock_upstream: Mock) -> None:
    mock_upstream.reset()


def _uid(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


# --- idempotency --------------------------------------------------------------------------------------------


def _idem_ask(p: Proxy, key: str, content: str = "hello") -> Any:
    return p.client(AGENT_KEY).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}],
        extra_headers={"Idempotency-Key": key})


def test_idempotent_retry_replays_without_upstream_call(backend: Proxy, mock_upstream: Mock) -> None:
    key = _uid("idem")
    text = _uid("hello")  # a conversation of its own, so its spend counter starts empty
    mock_upstream.script({"content": "first and only", "usage": {"prompt_tokens": 9, "completion_tokens": 3}})
    first = _idem_ask(backend, key, text)
    assert first.parse().choices[0].message.content == "first and only"
    assert "idempotent-replayed" not in first.headers
    assert len(mock_upstream.calls()) == 1

    counter = f"conversation:{AGENT_ID}/" + first.headers["x-guardproxy-conversation-id"]
    spent = backend.get(f"/v1/spend?prefix={counter}", key=ADMIN_KEY).json()["data"]
    assert [r["spend_usd"] for r in spent if r["counter"] == counter] == [first.headers["x-guardproxy-cost-usd"]]

    again = _idem_ask(backend, key, text)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.parse().id == first.parse().id
    assert backend.get(f"/v1/spend?prefix={counter}", key=ADMIN_KEY).json()["data"] == spent  # charged once
    assert again.parse().choices[0].message.content == "first and only"
    assert again.headers["x-guardproxy-decision-id"] == first.headers["x-guardproxy-decision-id"]
    assert len(mock_upstream.calls()) == 1  # served from the store, not the model

    # keys are scoped to the caller: another principal's identical key and body is a new request
    other = backend.client(OPEN_KEY).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}], extra_headers={"Idempotency-Key": key})
    assert "idempotent-replayed" not in other.headers
    assert len(mock_upstream.calls()) == 2


def test_failed_attempt_is_not_stored_for_replay(backend: Proxy, mock_upstream: Mock) -> None:
    key = _uid("idem-fail")
    mock_upstream.script({"status": 500, "error_message": "upstream broke"}, {"content": "second try works"})
    with pytest.raises(openai.APIStatusError) as exc:
        _idem_ask(backend, key)
    assert exc.value.status_code == 502
    retry = _idem_ask(backend, key)
    assert "idempotent-replayed" not in retry.headers
    assert retry.parse().choices[0].message.content == "second try works"
    assert len(mock_upstream.calls()) == 2


def test_idempotency_key_with_different_body_is_refused(backend: Proxy, mock_upstream: Mock) -> None:
    key = _uid("idem-reuse")
    _idem_ask(backend, key, "one body")
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        _idem_ask(backend, key, "another body")
    assert exc.value.status_code == 422
    assert exc.value.response.json()["error"]["code"] == "idempotency_key_reused"
    assert len(mock_upstream.calls()) == 1


def test_duplicate_while_first_in_flight_gets_409(backend: Proxy, mock_upstream: Mock) -> None:
    key = _uid("idem-flight")
    mock_upstream.script({"content": "slow", "delay_ms": 1500})
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(_idem_ask, backend, key)
        deadline = time.monotonic() + 10
        while not mock_upstream.calls():  # the first request has reached the model and waits there
            assert time.monotonic() < deadline, "first request never reached the upstream"
            time.sleep(0.02)
        with pytest.raises(openai.ConflictError) as exc:
            _idem_ask(backend, key)
        assert exc.value.status_code == 409
        assert exc.value.response.json()["error"]["code"] == "idempotency_in_flight"
        assert first.result(timeout=30).parse().choices[0].message.content == "slow"
    # once the first has completed, the same request replays it
    assert _idem_ask(backend, key).headers["idempotent-replayed"] == "true"
    assert len(mock_upstream.calls()) == 1


def test_overlong_idempotency_key_is_rejected(backend: Proxy, mock_upstream: Mock) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        _idem_ask(backend, "k" * 256)
    assert exc.value.status_code == 400
    assert exc.value.response.json()["error"]["code"] == "idempotency_key_too_long"
    assert mock_upstream.calls() == []
    assert _idem_ask(backend, _uid("k") + "k" * 230).status_code == 200  # 255 characters or fewer is fine


def test_empty_idempotency_key_has_its_own_code(backend: Proxy, mock_upstream: Mock) -> None:
    r = backend.post("/v1/chat/completions", key=AGENT_KEY, headers={"idempotency-key": ""},
                     json={"model": "gpt-4o-mini", "messages": USER})
    assert r.status_code == 400
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("idempotency_key_empty", "Idempotency-Key")
    assert mock_upstream.calls() == []


# --- approvals ----------------------------------------------------------------------------------------------


def _transfer(p: Proxy, mock: Mock, cid: str, amount: int, to: str = "acct-1") -> Any:
    """The model asks to call transfer_funds; returns the raw SDK response the agent gets."""
    mock.script({"tool_calls": [{"name": "transfer_funds", "arguments": f'{{"amount": {amount}, "to": "{to}"}}'}]})
    return p.client(AGENT_KEY).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=USER, tools=[TRANSFER], extra_headers={CONV: cid})


def _assert_held(raw: Any) -> str:
    msg = raw.parse().choices[0]
    assert not msg.message.tool_calls
    assert msg.finish_reason == "stop"
    content = msg.message.content or ""
    assert "awaits human approval" in content
    assert "big-transfer-needs-approval" in content
    approval_id: str = raw.headers["x-guardproxy-approval-id"]
    assert approval_id.startswith("apr_")
    assert approval_id in content  # the agent can tell a human which approval to look at
    return approval_id


def _assert_passed(raw: Any, amount: int) -> None:
    choice = raw.parse().choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].function.name == "transfer_funds"
    assert calls[0].function.arguments == f'{{"amount": {amount}, "to": "acct-1"}}'


def _pending(p: Proxy) -> list[dict[str, Any]]:
    resp = p.get("/admin/approvals?status=pending", key=ADMIN_KEY)
    assert resp.status_code == 200, resp.text
    items: list[dict[str, Any]] = resp.json()["data"]
    return items


def test_small_transfer_needs_no_approval(backend: Proxy, mock_upstream: Mock) -> None:
    raw = _transfer(backend, mock_upstream, _uid("conv-small"), 50)
    _assert_passed(raw, 50)
    assert "x-guardproxy-approval-id" not in raw.headers


def test_approved_call_passes_once_in_its_conversation(backend: Proxy, mock_upstream: Mock) -> None:
    cid = _uid("conv-approve")
    aid = _assert_held(_transfer(backend, mock_upstream, cid, 500))
    listed = {a["id"]: a for a in _pending(backend)}
    assert aid in listed
    assert listed[aid]["tool"] == "transfer_funds"
    assert listed[aid]["conversation"] == cid
    assert listed[aid]["rule_id"] == "big-transfer-needs-approval"
    assert listed[aid]["principal"] == AGENT_ID
    # asking again before a human decides keeps the same pending approval
    assert _assert_held(_transfer(backend, mock_upstream, cid, 500)) == aid
    assert backend.post(f"/admin/approvals/{aid}/approve", key=AGENT_KEY).status_code in (401, 403)

    decided = backend.post(f"/admin/approvals/{aid}/approve", key=ADMIN_KEY, json={"note": "ok by finance"})
    assert decided.status_code == 200, decided.text
    assert decided.json()["status"] == "approved"
    assert aid not in {a["id"] for a in _pending(backend)}

    # a different conversation does not inherit the approval
    _assert_held(_transfer(backend, mock_upstream, _uid("conv-other"), 500))
    # changed arguments in the same conversation stay held (a new approval)
    changed = _assert_held(_transfer(backend, mock_upstream, cid, 600))
    assert changed != aid

    raw = _transfer(backend, mock_upstream, cid, 500)
    _assert_passed(raw, 500)
    assert raw.headers["x-guardproxy-approval-id"] == aid
    assert "approved:transfer_funds" in raw.headers["x-guardproxy-actions"]

    # the approval was used up: the same call again needs a fresh one
    again = _assert_held(_transfer(backend, mock_upstream, cid, 500))
    assert again != aid


def test_rejected_call_stays_held(backend: Proxy, mock_upstream: Mock) -> None:
    cid = _uid("conv-reject")
    aid = _assert_held(_transfer(backend, mock_upstream, cid, 900))
    decided = backend.post(f"/admin/approvals/{aid}/reject", key=ADMIN_KEY, json={"note": "no"})
    assert decided.status_code == 200, decided.text
    assert decided.json()["status"] == "rejected"
    for _ in range(2):
        assert _assert_held(_transfer(backend, mock_upstream, cid, 900)) == aid
    # a decided approval cannot be flipped
    flip = backend.post(f"/admin/approvals/{aid}/approve", key=ADMIN_KEY)
    assert flip.status_code == 409
    assert flip.json()["error"]["code"] == "approval_not_pending"
    assert backend.post("/admin/approvals/apr_doesnotexist/approve", key=ADMIN_KEY).status_code == 404


def test_approval_is_not_usable_by_another_key_in_the_same_conversation(backend: Proxy, mock_upstream: Mock) -> None:
    # conversation ids come from clients: a second key reusing one must not spend the first key's approval
    cid = _uid("conv-shared")
    aid = _assert_held(_transfer(backend, mock_upstream, cid, 800))
    assert backend.post(f"/admin/approvals/{aid}/approve", key=ADMIN_KEY).status_code == 200
    mock_upstream.script({"tool_calls": [{"name": "transfer_funds", "arguments": '{"amount": 800, "to": "acct-1"}'}]})
    other = backend.client(OPEN_KEY).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=USER, tools=[TRANSFER], extra_headers={CONV: cid})
    other_id = _assert_held(other)
    assert other_id != aid
    _assert_passed(_transfer(backend, mock_upstream, cid, 800), 800)  # still there for its own key


def test_streamed_call_is_held_then_released(backend: Proxy, mock_upstream: Mock) -> None:
    cid = _uid("conv-stream")
    args = '{"amount": 300, "to": "acct-1"}'

    def ask() -> tuple[str, list[Any]]:
        mock_upstream.script({"tool_calls": [{"name": "transfer_funds", "arguments": args}]})
        chunks = list(backend.client(AGENT_KEY).chat.completions.create(
            model="gpt-4o-mini", messages=USER, tools=[TRANSFER], stream=True, extra_headers={CONV: cid}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
        return text, calls

    text, calls = ask()
    assert calls == [] and "awaits human approval" in text  # no byte of the held call reached the agent
    aid = next(a["id"] for a in _pending(backend) if a["conversation"] == cid)
    assert aid in text
    assert backend.post(f"/admin/approvals/{aid}/approve", key=ADMIN_KEY).status_code == 200
    text, calls = ask()
    assert [(tc.function.name, tc.function.arguments) for tc in calls] == [("transfer_funds", args)]


# --- Redis only: replicas sharing one store ---------------------------------------------------------------


def test_replicas_share_one_budget(replicas: list[Proxy], mock_upstream: Mock) -> None:
    # Each request reserves and settles exactly $0.10 (1000 output tokens at $100/Mtok); the key's budget
    # is $1/day, so across all three replicas at most ten of sixty simultaneous requests are served.
    mock_upstream.script(*[{"content": "ok", "delay_ms": 200,
                            "usage": {"prompt_tokens": 5, "completion_tokens": 1000}}] * 10)

    async def one(client: Any, i: int) -> tuple[int, str | None, str | None]:
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model="priced-model", messages=[{"role": "user", "content": f"r{i}"}], max_tokens=1000)
        except openai.APIStatusError as e:
            return e.status_code, None, e.response.json()["error"]["code"]
        return raw.status_code, raw.headers["x-guardproxy-cost-usd"], None

    async def run() -> list[tuple[int, str | None, str | None]]:
        clients = [p.aclient(BUDGET_KEY) for p in replicas]
        try:
            return await asyncio.gather(*(one(clients[i % 3], i) for i in range(60)))
        finally:
            for c in clients:
                await c.close()

    results = asyncio.run(run())
    statuses = [s for s, _, _ in results]
    assert all(s in (200, 429) for s in statuses), statuses
    served = [cost for s, cost, _ in results if s == 200]
    assert 1 <= len(served) <= 10
    assert len(served) == 10  # settled cost equals the reservation: nothing frees up
    assert {code for s, _, code in results if s == 429} == {"budget_exceeded"}
    assert len(mock_upstream.calls()) == len(served)
    total = sum(int(c.replace(".", "")) for c in served if c is not None)
    for p in replicas:  # every replica reads the same counter
        rows = p.get(f"/v1/spend?prefix=key:{BUDGET_ID}:", key=ADMIN_KEY).json()["data"]
        assert len(rows) == 1
        assert int(rows[0]["spend_usd"].replace(".", "")) == total <= 1_000_000


def test_approval_on_one_replica_releases_call_on_another(replicas: list[Proxy], mock_upstream: Mock) -> None:
    a, b, c = replicas
    cid = _uid("conv-replicas")
    aid = _assert_held(_transfer(a, mock_upstream, cid, 700))
    assert aid in {x["id"] for x in _pending(c)}  # every replica lists it
    assert a.post(f"/admin/approvals/{aid}/approve", key=ADMIN_KEY).json()["status"] == "approved"
    raw = _transfer(b, mock_upstream, cid, 700)
    _assert_passed(raw, 700)
    assert raw.headers["x-guardproxy-approval-id"] == aid
    # used once, on B: C holds the next identical call again
    assert _assert_held(_transfer(c, mock_upstream, cid, 700)) != aid


def test_idempotency_is_shared_across_replicas(replicas: list[Proxy], mock_upstream: Mock) -> None:
    key = _uid("idem-replicas")
    mock_upstream.script({"content": "once across replicas"})
    first = _idem_ask(replicas[0], key)
    again = _idem_ask(replicas[1], key)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.parse().id == first.parse().id
    assert len(mock_upstream.calls()) == 1


# --- Redis only: the store is down ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dead(make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> Proxy:
    """A proxy whose Redis is a port nobody listens on."""
    return make_proxy(policies=POLICIES, config=_config(mock_upstream, DEAD))


def test_dead_store_fail_closed_refuses_with_503(dead: Proxy, mock_upstream: Mock) -> None:
    for kw in ({}, {"stream": True}, {"extra_headers": {"Idempotency-Key": _uid("k")}}):
        with pytest.raises(openai.APIStatusError) as exc:
            dead.client(AGENT_KEY).chat.completions.create(model="gpt-4o-mini", messages=USER, **kw)
        assert exc.value.status_code == 503, kw
        assert exc.value.response.json()["error"]["code"] == "state_unavailable"
    assert mock_upstream.calls() == []
    assert dead.get("/readyz").status_code == 503
    assert dead.get("/readyz").json()["store"]["reachable"] is False
    for resp in (dead.get("/admin/approvals?status=pending", key=ADMIN_KEY), dead.get("/v1/spend", key=ADMIN_KEY),
                 dead.post("/admin/approvals/apr_0123456789abcdef/approve", key=ADMIN_KEY)):
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "state_unavailable"
    assert dead.get("/metrics").status_code == 200


def test_dead_store_fail_open_serves_degraded(dead: Proxy, mock_upstream: Mock) -> None:
    client = dead.client(OPEN_KEY)
    for i in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"hi {i}"}],
            extra_headers={"Idempotency-Key": _uid("k")})
        assert raw.status_code == 200
        assert raw.headers["x-guardproxy-degraded"] == "true"
        assert raw.parse().choices[0].message.content
    raw_stream = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=USER, stream=True)
    assert raw_stream.headers["x-guardproxy-degraded"] == "true"
    chunks = list(raw_stream.parse())
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    # an action that needs a human stays held when no approval can be looked up or recorded
    mock_upstream.script({"tool_calls": [{"name": "transfer_funds", "arguments": '{"amount": 500, "to": "x"}'}]})
    held = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=USER, tools=[TRANSFER])
    assert held.headers["x-guardproxy-degraded"] == "true"
    assert not held.parse().choices[0].message.tool_calls
    assert "human approval" in (held.parse().choices[0].message.content or "")
    assert len(mock_upstream.calls()) == 5
    assert "Traceback" not in dead.output()


# --- multi-worker on the memory store --------------------------------------------------------------------


def test_workers_with_memory_store_refuse_to_start(tmp_path: Any, mock_upstream: Mock) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "agent.yaml").write_text(POLICIES["agent.yaml"])
    (tmp_path / "guardproxy.yaml").write_text(yaml.safe_dump(_config(mock_upstream, "memory")))
    proc = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(tmp_path / "guardproxy.yaml"),
                           "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "shared store" in proc.stderr
    assert "redis://" in proc.stderr


def test_streamed_response_replays_immediately(backend: Proxy, mock_upstream: Mock) -> None:
    key = _uid("idem-stream")
    mock_upstream.script({"content": "streamed once", "chunk_chars": 3})
    client = backend.client(AGENT_KEY)
    first = list(client.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True,
                                                extra_headers={"Idempotency-Key": key}))
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=USER, stream=True,
                                                           extra_headers={"Idempotency-Key": key})
    assert raw.headers["idempotent-replayed"] == "true"
    again = list(raw.parse())
    assert [c.model_dump() for c in again] == [c.model_dump() for c in first]
    assert len(mock_upstream.calls()) == 1
