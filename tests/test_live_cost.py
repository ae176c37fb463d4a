"""Live-server tests of the cost governor: ladder, compression, settlement, refusals and concurrency.

One ``guardproxy serve`` (memory store) runs in front of ``guardproxy mock-upstream`` with one key per
concern, each governed by its own policy, so that tests do not share budgets. Costs are made exactly
computable by scripting the upstream's ``usage``: gpt-4o costs 2.5 µ$ per input token and 10 µ$ per
output token, gpt-4o-mini 0.15 and 0.6; the ``priced-model`` route costs nothing per input token and
100 µ$ per output token, so ``max_tokens=1000`` reserves exactly $0.10.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
import tiktoken
import yaml
from conftest import ADMIN_KEY, Mock, Proxy, default_config, free_port

from proxy.tokens import configure_offline_encodings

LADDER_KEY = "sk-cost-ladder"
COMPRESS_KEY = "sk-cost-compress"
PLAIN_KEY = "sk-cost-plain"
CONC_KEY = "sk-cost-concurrency"
CONV = "x-guardproxy-conversation-id"


def _policy(name: str, key_id: str, cost: dict[str, Any] | None) -> str:
    doc: dict[str, Any] = {"apiVersion": "guardproxy/v1", "kind": "Policy", "metadata": {"name": name},
                           "match": {"keys": [key_id]}}
    if cost is not None:
        doc["cost"] = cost
    return yaml.safe_dump(doc)


POLICIES = {
    "ladder.yaml": _policy("ladder", "cost-ladder", {
        "per_conversation_usd": 0.01,
        "ladder": [{"at": 0.8, "downgrade": {"gpt-4o": "gpt-4o-mini"}},
                   {"at": 0.9, "compress_to_tokens": 60}]}),
    "compress.yaml": _policy("compress", "cost-compress", {"compress": {"above_tokens": 4000, "to_tokens": 3000}}),
    "plain.yaml": _policy("plain", "cost-plain", None),
    **{f"concurrency-{n}.yaml": _policy(f"concurrency-{n}", f"cost-concurrency-{n}", {
        "budgets": [{"scope": "key", "window": "day", "usd": 1}]}) for n in (1000, 400)},
}


@pytest.fixture(scope="module")
def gov(make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> Proxy:
    cfg = default_config(mock_upstream.url, free_port())
    route = {"api_base": mock_upstream.url, "api_key": "sk-upstream-secret-not-for-clients"}
    cfg["models"] += [
        {"name": "priced-model", "upstream": "openai/priced-model",
         "price": {"input_per_mtok": 0, "output_per_mtok": 100}, **route},
        {"name": "mystery", "upstream": "openai/mystery-model-x", **route},
    ]
    cfg["keys"] = [{"id": "cost-ladder", "key": LADDER_KEY}, {"id": "cost-compress", "key": COMPRESS_KEY},
                   {"id": "cost-plain", "key": PLAIN_KEY},
                   *({"id": f"cost-concurrency-{n}", "key": f"{CONC_KEY}-{n}"} for n in (1000, 400))]
    return make_proxy(policies=POLICIES, config=cfg)


@pytest.fixture(autouse=True)
def _fresh_mock(mock_upstream: Mock) -> None:
    mock_upstream.reset()


def _cid(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


def _spend(p: Proxy, counter: str) -> int | None:
    """Settled µ$ of one counter (admin view of ``/v1/spend``), None when it has no spend yet."""
    rows = p.get(f"/v1/spend?prefix={counter}", key=ADMIN_KEY).json()["data"]
    for r in rows:
        if r["counter"] == counter:
            return _micro(r["spend_usd"])
    return None


def _micro(usd: str) -> int:
    whole, frac = usd.split(".")
    return int(whole) * 1_000_000 + int(frac.ljust(6, "0"))


def _wait_spend(p: Proxy, counter: str, at_least: int = 1, timeout: float = 15.0) -> int:
    """Streams settle after the last byte is sent; wait (bounded) for the counter to show it."""
    deadline = time.monotonic() + timeout
    while True:
        got = _spend(p, counter)
        if got is not None and got >= at_least:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{counter} never reached {at_least} µ$ (last: {got})")
        time.sleep(0.05)


def _ask(p: Proxy, key: str, cid: str, model: str, messages: list[dict[str, Any]], **kw: Any) -> Any:
    return p.client(key).chat.completions.with_raw_response.create(
        model=model, messages=messages, extra_headers={CONV: cid}, **kw)


def _turns(n: int, words: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(n):
        out.append({"role": "user", "content": f"question {i}: " + " ".join(f"alpha{i}x{j}" for j in range(words))})
        out.append({"role": "assistant", "content": f"answer {i}: " + " ".join(f"beta{i}y{j}" for j in range(words))})
    return out


# --- the ladder: downgrade at 80 %, compress at 90 %, refuse at 100 % ---------------------------------------


def test_ladder_downgrades_then_compresses_then_refuses(gov: Proxy, mock_upstream: Mock) -> None:
    cid = _cid("ladder")
    system = {"role": "system", "content": "You are terse."}
    # Usage the upstream reports is believed up to the bounds the proxy sent (max_tokens; about twice its
    # own prompt count), so the costs below come mostly from completion tokens.
    # Turn 1 on gpt-4o: 200 x 2.5 + 750 x 10 = 8000 µ$ = 80 % of the $0.01 conversation ceiling.
    mock_upstream.script({"content": "one", "usage": {"prompt_tokens": 200, "completion_tokens": 750}})
    raw = _ask(gov, LADDER_KEY, cid, "gpt-4o", [system, {"role": "user", "content": "hi"}], max_tokens=800)
    assert raw.headers["x-guardproxy-model"] == "gpt-4o"
    assert raw.headers["x-guardproxy-cost-usd"] == "0.008000"
    assert raw.headers["x-guardproxy-conversation-spend-usd"] == "0.008000"
    assert mock_upstream.calls()[-1]["body"]["model"] == "gpt-4o"

    # Turn 2: fill 0.8 -> served by the downgrade target. 200 x 0.15 + 2450 x 0.6 = 1500 µ$ -> 9500 µ$ (95 %).
    mock_upstream.script({"content": "two", "usage": {"prompt_tokens": 200, "completion_tokens": 2450}})
    raw = _ask(gov, LADDER_KEY, cid, "gpt-4o", [system, {"role": "user", "content": "again"}], max_tokens=2500)
    assert raw.parse().choices[0].message.content == "two"
    assert raw.headers["x-guardproxy-model"] == "gpt-4o-mini"
    assert "downgraded:gpt-4o->gpt-4o-mini" in raw.headers["x-guardproxy-actions"]
    assert mock_upstream.calls()[-1]["body"]["model"] == "gpt-4o-mini"
    assert raw.headers["x-guardproxy-conversation-spend-usd"] == "0.009500"

    # Turn 3: fill 0.95 -> downgraded and compressed to 60 tokens: old turns go, system + latest stay.
    history = [system, *_turns(3, 12), {"role": "user", "content": "latest question"}]
    # 250 x 0.15 + 700 x 0.6 = 457.5 -> 458 µ$ -> 9958 µ$
    mock_upstream.script({"content": "three", "usage": {"prompt_tokens": 250, "completion_tokens": 700}})
    raw = _ask(gov, LADDER_KEY, cid, "gpt-4o", history, max_tokens=700)
    assert raw.headers["x-guardproxy-model"] == "gpt-4o-mini"
    assert "compressed:" in raw.headers["x-guardproxy-actions"]
    sent = mock_upstream.calls()[-1]["body"]
    assert sent["model"] == "gpt-4o-mini"
    assert len(sent["messages"]) < len(history)
    assert sent["messages"][0] == system
    assert sent["messages"][-1] == {"role": "user", "content": "latest question"}
    assert raw.headers["x-guardproxy-conversation-spend-usd"] == "0.009958"

    # Turn 4: 9958 µ$ spent of 10000; even downgraded, 100 output tokens (60 µ$) do not fit -> 429
    # budget_exceeded with the budget detail, nothing sent upstream.
    calls_before = len(mock_upstream.calls())
    with pytest.raises(openai.RateLimitError) as exc:
        _ask(gov, LADDER_KEY, cid, "gpt-4o", [system, {"role": "user", "content": "more"}], max_tokens=100)
    assert exc.value.status_code == 429
    err = exc.value.response.json()["error"]
    assert err["code"] == "budget_exceeded"
    assert err["type"] == "rate_limit_error"
    assert err["budget"]["scope"] == "conversation"
    assert err["budget"]["spent_usd"] == "0.009958"
    assert err["budget"]["limit_usd"] == "0.010000"
    assert len(mock_upstream.calls()) == calls_before
    assert _spend(gov, f"conversation:cost-ladder/{cid}") == 9958


# --- static compression ---------------------------------------------------------------------------------------


def _o200k_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """OpenAI's chat accounting: 3 tokens per message + role + content, plus 3 reply-priming tokens."""
    configure_offline_encodings()  # the bundled o200k file: no network
    enc = tiktoken.get_encoding("o200k_base")
    return 3 + sum(3 + len(enc.encode(m["role"])) + len(enc.encode(m["content"])) for m in messages)


def test_long_history_is_compressed_before_it_leaves(gov: Proxy, mock_upstream: Mock) -> None:
    system = {"role": "system", "content": "You are a careful support assistant. Keep answers short."}
    history = [system, *_turns(12, 60), {"role": "user", "content": "So what is the final answer?"}]
    before = _o200k_prompt_tokens(history)
    assert 5500 <= before <= 7000, before  # the scenario: a ~6,000-token history
    mock_upstream.script({"content": "short", "usage": {"prompt_tokens": 2900, "completion_tokens": 3}})
    raw = _ask(gov, COMPRESS_KEY, _cid("compress"), "gpt-4o-mini", history, max_tokens=10)
    assert raw.parse().choices[0].message.content == "short"
    assert "compressed:" in raw.headers["x-guardproxy-actions"]
    sent = mock_upstream.calls()[-1]["body"]["messages"]
    assert _o200k_prompt_tokens(sent) <= 3000
    assert sent[0] == system
    assert sent[-1] == history[-1]
    # whole turns were dropped from the oldest end: what is left is the newest contiguous tail
    assert sent[1:] == history[len(history) - len(sent) + 1:]
    assert sent[1]["role"] == "user"
    assert history[1] not in sent


def test_short_history_is_not_compressed(gov: Proxy, mock_upstream: Mock) -> None:
    history = [{"role": "system", "content": "sys"}, *_turns(2, 10), {"role": "user", "content": "q"}]
    mock_upstream.script({"content": "ok"})
    raw = _ask(gov, COMPRESS_KEY, _cid("nocompress"), "gpt-4o-mini", history, max_tokens=10)
    assert "compressed" not in raw.headers.get("x-guardproxy-actions", "")
    assert mock_upstream.calls()[-1]["body"]["messages"] == history


# --- settlement ---------------------------------------------------------------------------------------------


def test_non_streamed_request_settles_to_reported_usage(gov: Proxy, mock_upstream: Mock) -> None:
    cid = _cid("settle-json")
    # max_tokens=4000 reserves far more than the reply uses; the settlement is the real usage:
    # 250 x 0.15 + 500 x 0.6 = 337.5 -> 338 µ$ (rounded up)
    mock_upstream.script({"content": "done", "usage": {"prompt_tokens": 250, "completion_tokens": 500}})
    raw = _ask(gov, PLAIN_KEY, cid, "gpt-4o-mini", [{"role": "user", "content": "hi"}], max_tokens=4000)
    assert raw.headers["x-guardproxy-cost-usd"] == "0.000338"
    assert "x-guardproxy-cost-estimate" not in raw.headers
    assert _spend(gov, f"conversation:cost-plain/{cid}") == 338


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": -5}},
    {"prompt_tokens": 10, "completion_tokens": -5},
    {"prompt_tokens": 10.5, "completion_tokens": 2},
    {"prompt_tokens": "10", "completion_tokens": 2},
    {"prompt_tokens": True, "completion_tokens": 2},
    [10, 2],
])
def test_unreadable_usage_is_a_502_and_charges_nothing(gov: Proxy, mock_upstream: Mock, usage: Any) -> None:
    cid = _cid("bad-usage")
    mock_upstream.script({"content": "x", "raw_usage": usage})
    r = gov.post("/v1/chat/completions", key=PLAIN_KEY, headers={CONV: cid},
                 json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100})
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_error"
    assert r.json()["error"]["decision_id"] == r.headers["x-guardproxy-decision-id"]
    assert _spend(gov, f"conversation:cost-plain/{cid}") is None  # the reservation was released


@pytest.mark.parametrize("client_usage", [True, False])
def test_streamed_request_settles_to_reported_usage(gov: Proxy, mock_upstream: Mock, client_usage: bool) -> None:
    cid = _cid("settle-sse")
    # gpt-4o: 200 x 2.5 + 200 x 10 = 2500 µ$
    mock_upstream.script({"content": "streamed words here", "chunk_chars": 4,
                          "usage": {"prompt_tokens": 200, "completion_tokens": 200}})
    kw: dict[str, Any] = {"stream_options": {"include_usage": True}} if client_usage else {}
    stream = gov.client(PLAIN_KEY).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=4000, stream=True,
        extra_headers={CONV: cid}, **kw)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "streamed words here"
    usage = [c.usage for c in chunks if c.usage is not None]
    if client_usage:
        assert [(u.prompt_tokens, u.completion_tokens) for u in usage] == [(200, 200)]
    else:
        assert usage == []  # the proxy asked upstream for usage, but does not pass it on unasked
    assert mock_upstream.calls()[-1]["body"]["stream_options"] == {"include_usage": True}
    assert _wait_spend(gov, f"conversation:cost-plain/{cid}") == 2500


def test_client_disconnect_mid_stream_is_still_charged(gov: Proxy, mock_upstream: Mock) -> None:
    cid = _cid("disconnect")
    counter = f"conversation:cost-plain/{cid}"
    mock_upstream.script({"content": "word " * 200, "chunk_chars": 5, "chunk_delay_ms": 50,
                          "usage": {"prompt_tokens": 5000, "completion_tokens": 1000}})
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "tell me a long story"}],
            "max_tokens": 2000, "stream": True}
    headers = {"authorization": f"Bearer {PLAIN_KEY}", CONV: cid}
    got = 0
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", gov.url + "/chat/completions", json=body, headers=headers) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and "word" in line:
                got += 1
                if got == 3:
                    break  # leave before the usage chunk: the proxy must charge what it saw
    assert got == 3
    charged = _wait_spend(gov, counter)
    # no usage arrived: the prompt (a few tokens at 2.5 µ$) plus the text streamed so far (10 µ$/token),
    # far below the 5000 + 1000 tokens the upstream would have reported at the end
    assert 0 < charged < 5000 * 2.5 + 1000 * 10


# --- refusals before anything leaves ---------------------------------------------------------------------


def test_unpriced_model_is_refused(gov: Proxy, mock_upstream: Mock) -> None:
    with pytest.raises(openai.PermissionDeniedError) as exc:
        gov.client(PLAIN_KEY).chat.completions.create(model="mystery", messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 403
    err = exc.value.response.json()["error"]
    assert err["code"] == "unpriced_model"
    assert err["param"] == "model"
    assert mock_upstream.calls() == []


def test_huge_max_tokens_is_clamped_to_model_limit_before_reserving(gov: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "ok", "usage": {"prompt_tokens": 5, "completion_tokens": 1}})
    raw = _ask(gov, PLAIN_KEY, _cid("clamp"), "gpt-4o-mini", [{"role": "user", "content": "x"}],
               max_tokens=10**9)
    assert raw.parse().choices[0].message.content == "ok"
    sent = mock_upstream.calls()[-1]["body"]
    assert sent["max_tokens"] <= 16384  # gpt-4o-mini's output limit
    assert sent["max_tokens"] == 16384


# --- concurrency: reservations are atomic -------------------------------------------------------------------


@pytest.mark.parametrize("completion_tokens", [1000, 400])
def test_concurrent_requests_never_overspend(gov: Proxy, mock_upstream: Mock, completion_tokens: int) -> None:
    # Each request reserves exactly $0.10 (1000 output tokens x $100/Mtok) against a $1/day key budget, so
    # at most 10 of 50 simultaneous requests hold a reservation at once. Settling at the full $0.10 frees
    # nothing (exactly 10 served); settling at $0.04 frees room, but spend can still never pass $1.
    counter_prefix = f"key:cost-concurrency-{completion_tokens}:"
    key = f"{CONC_KEY}-{completion_tokens}"
    mock_upstream.script(*[{"content": "fine", "delay_ms": 200,
                            "usage": {"prompt_tokens": 12, "completion_tokens": completion_tokens}}] * 50)

    async def one(client: Any, i: int) -> tuple[int, str | None, Any]:
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model="priced-model", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=1000,
                extra_headers={CONV: f"conc-{completion_tokens}-{i}"})
        except openai.APIStatusError as e:
            return e.status_code, None, e.response
        return raw.status_code, raw.headers["x-guardproxy-cost-usd"], None

    async def run() -> list[tuple[int, str | None, Any]]:
        async with gov.aclient(key) as client:
            return await asyncio.gather(*(one(client, i) for i in range(50)))

    results = asyncio.run(run())
    served = [cost for status, cost, _ in results if status == 200]
    refused = [resp for status, _, resp in results if status == 429]
    assert len(served) + len(refused) == 50, [r[0] for r in results]
    assert 1 <= len(served) <= 1_000_000 // (completion_tokens * 100)
    if completion_tokens == 1000:
        assert len(served) == 10
    for resp in refused:
        assert resp is not None
        err = resp.json()["error"]
        assert err["code"] == "budget_exceeded" and err["budget"]["scope"] == "key"
        assert err["budget"]["window"] == "day" and err["budget"]["limit_usd"] == "1.000000"
        assert int(resp.headers["retry-after"]) >= 1
    assert len(mock_upstream.calls()) == len(served)
    assert set(served) == {f"0.{completion_tokens * 100:06d}"}
    rows = gov.get(f"/v1/spend?prefix={counter_prefix}", key=ADMIN_KEY).json()["data"]
    assert len(rows) == 1
    assert _micro(rows[0]["spend_usd"]) == sum(_micro(c) for c in served if c is not None)
    assert _micro(rows[0]["spend_usd"]) <= 1_000_000
