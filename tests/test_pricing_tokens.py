"""proxy/pricing.py and proxy/tokens.py: litellm price map without importing litellm; cached token counts."""

from __future__ import annotations

import os
import subprocess
import sys
from decimal import Decimal
from typing import Any

import pytest

from proxy.pricing import (
    Price,
    PriceBook,
    litellm_package_dir,
    load_litellm_price_map,
    price_from_litellm_entry,
    usd_per_mtok_to_micro,
)
from proxy.tokens import CL100K, O200K, TokenCounter, configure_offline_encodings, encoding_for


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook.load()


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()


# --- pricing ---------------------------------------------------------------------------------------


def test_gpt4o_price_in_integer_micro(book: PriceBook) -> None:
    p = book.lookup("gpt-4o")
    assert p == Price(2_500_000, 10_000_000, 1_250_000, max_output_tokens=16_384, max_input_tokens=128_000)


def test_gpt4o_mini_and_provider_prefix(book: PriceBook) -> None:
    mini = book.lookup("gpt-4o-mini")
    assert mini is not None
    assert (mini.input_per_mtok, mini.output_per_mtok, mini.cached_input_per_mtok) == (
        150_000,
        600_000,
        75_000,
    )
    assert book.lookup("openai/gpt-4o") == book.lookup("gpt-4o")
    assert book.lookup("openrouter/openai/gpt-4o-mini") == mini


def test_unknown_model_is_none(book: PriceBook) -> None:
    assert book.lookup("no-such-model-xyz") is None
    assert book.lookup("sample_spec") is None
    assert book.lookup("") is None


def test_zero_override_is_a_price_not_none(book: PriceBook) -> None:
    free = book.with_overrides({"local-llama": {"input_per_mtok": 0, "output_per_mtok": 0.0}})
    assert free.lookup("local-llama") == Price(0, 0, 0, None, None)
    assert free.lookup("ollama/local-llama") == Price(0, 0, 0, None, None)
    assert book.lookup("local-llama") is None  # the original book is unchanged


def test_override_beats_map_converts_exactly_and_keeps_limits(book: PriceBook) -> None:
    b = PriceBook.load(
        {"gpt-4o": {"input_per_mtok": 2.2, "output_per_mtok": "8.8", "cached_input_per_mtok": 0.000001}},
        price_map={
            "gpt-4o": {
                "input_cost_per_token": 2.5e-06,
                "output_cost_per_token": 1e-05,
                "max_output_tokens": 16384,
                "max_input_tokens": 128000,
            }
        },
    )
    assert b.lookup("gpt-4o") == Price(
        2_200_000, 8_800_000, 1, max_output_tokens=16_384, max_input_tokens=128_000
    )
    assert b.lookup("azure/gpt-4o") == b.lookup("gpt-4o")
    explicit = b.with_overrides(
        {"gpt-4o": {"input_per_mtok": 1, "output_per_mtok": 1, "max_output_tokens": 99}}
    )
    p = explicit.lookup("gpt-4o")
    assert p is not None and p.cached_input_per_mtok == 1_000_000 and p.max_output_tokens == 99


def test_override_accepts_model_objects(book: PriceBook) -> None:
    class Override:
        def model_dump(self) -> dict[str, Any]:
            return {"input_per_mtok": Decimal("3"), "output_per_mtok": 15, "cached_input_per_mtok": None}

    p = book.with_overrides({"my-claude": Override()}).lookup("my-claude")
    assert p == Price(3_000_000, 15_000_000, 3_000_000, None, None)


@pytest.mark.parametrize(
    "raw",
    [
        {"input_per_mtok": 1},
        {"input_per_mtok": 1, "output_per_mtok": 1, "typo": 1},
        {"input_per_mtok": -1, "output_per_mtok": 1},
        {"input_per_mtok": 0.0000001, "output_per_mtok": 1},
        {"input_per_mtok": True, "output_per_mtok": 1},
        {"input_per_mtok": "abc", "output_per_mtok": 1},
        {"input_per_mtok": float("nan"), "output_per_mtok": 1},
        [1, 2],
    ],
)
def test_bad_overrides_raise(book: PriceBook, raw: object) -> None:
    with pytest.raises(ValueError):
        book.with_overrides({"m": raw})


def test_litellm_entry_conversion_rules() -> None:
    # non-whole µ$/Mtok rounds up so the proxy never under-charges
    odd = price_from_litellm_entry(
        {"input_cost_per_token": 2.9999900000000002e-06, "output_cost_per_token": 0}
    )
    assert odd is not None and odd.input_per_mtok == 2_999_991 and odd.output_per_mtok == 0
    emb = price_from_litellm_entry({"input_cost_per_token": 2e-08, "mode": "embedding"})
    assert emb == Price(20_000, 0, 20_000, None, None)
    assert price_from_litellm_entry({"input_cost_per_token": 1e-06, "mode": "chat"}) is None
    assert price_from_litellm_entry({"input_cost_per_token": 1e-06, "output_cost_per_token": "x"}) is None
    assert price_from_litellm_entry({"output_cost_per_token": 1e-06}) is None
    assert price_from_litellm_entry("not a dict") is None
    assert usd_per_mtok_to_micro("2.50", field="f") == 2_500_000


def test_price_map_loads_without_importing_litellm() -> None:
    code = (
        "import sys; from proxy.pricing import PriceBook; from proxy.tokens import TokenCounter; "
        "b = PriceBook.load(); assert b.lookup('gpt-4o') is not None; "
        "t = TokenCounter(); assert t.count_text('gpt-4o', 'hello world') == 2; "
        "print('litellm' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


def test_raw_map_is_big_and_located_in_package() -> None:
    pkg = litellm_package_dir()
    assert pkg is not None and pkg.endswith("litellm")
    assert len(load_litellm_price_map()) > 1000


# --- tokens ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", O200K),
        ("gpt-4o-mini", O200K),
        ("openai/gpt-4o-2024-08-06", O200K),
        ("gpt-4.1-nano", O200K),
        ("o1", O200K),
        ("o3-mini", O200K),
        ("o4-mini", O200K),
        ("gpt-4", CL100K),
        ("gpt-4-turbo", CL100K),
        ("gpt-3.5-turbo", CL100K),
        ("claude-3-5-sonnet", CL100K),  # approximation for non-OpenAI models
        ("o1x", CL100K),
    ],
)
def test_encoding_for(model: str, encoding: str) -> None:
    assert encoding_for(model) == encoding


def test_offline_cache_dir_points_at_litellm_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    configure_offline_encodings()
    assert os.environ["TIKTOKEN_CACHE_DIR"].endswith(os.path.join("litellm_core_utils", "tokenizers"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/operator/choice")
    configure_offline_encodings()
    assert os.environ["TIKTOKEN_CACHE_DIR"] == "/operator/choice"


def test_count_text_known_values(counter: TokenCounter) -> None:
    assert counter.count_text("gpt-4", "hello world") == 2
    assert counter.count_text("gpt-4o", "hello world") == 2
    assert counter.count_text("gpt-4", "") == 0
    # special-token text is ordinary text, not an error
    assert counter.count_text("gpt-4o", "<|endoftext|>") > 1


# OpenAI cookbook "How to count tokens with tiktoken": 129 tokens (gpt-3.5/gpt-4), 124 (gpt-4o)
COOKBOOK = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more time to touch base "
        "on opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]


def test_count_messages_matches_openai_cookbook(counter: TokenCounter) -> None:
    assert counter.count_messages("gpt-4-0613", COOKBOOK) == 129
    assert counter.count_messages("gpt-3.5-turbo", COOKBOOK) == 129
    assert counter.count_messages("gpt-4o", COOKBOOK) == 124
    assert counter.count_messages("gpt-4o", []) == 3


def test_parts_images_tool_calls_and_tool_messages() -> None:
    c = TokenCounter()

    def t(s: str) -> int:
        return c.count_text("gpt-4o", s)

    parts = {
        "role": "user",
        "content": [
            {"type": "text", "text": "hello world"},
            {"type": "image_url", "image_url": {"url": "data:..."}},
            {"type": "text", "text": 7},
            "bare string",
        ],
    }
    # an image without detail: low counts 85, anything else its high-detail bound
    assert c.count_messages("gpt-4o", [parts]) == 3 + 3 + t("user") + 2 + 1445 + 0 + t("bare string")
    low = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:...", "detail": "low"}}]}
    assert c.count_messages("gpt-4o", [low]) == 3 + 3 + t("user") + 85
    audio = {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "QUJD" * 5000}}]}
    assert c.count_messages("gpt-4o", [audio]) > 5000  # a large payload never passes as a few tokens
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            },
            {"id": "c2", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
            {"id": "c3", "type": "function", "function": "junk"},
        ],
    }
    expected_call = 3 + t("assistant") + t("get_weather") + t('{"city":"Paris"}') + t("f") + t('{"x":1}')
    assert c.count_messages("gpt-4o", [call]) == 3 + expected_call
    tool = {"role": "tool", "tool_call_id": "c1", "content": "18C"}
    assert c.count_messages("gpt-4o", [tool]) == 3 + 3 + t("tool") + t("18C")
    legacy = {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}
    assert c.count_messages("gpt-4o", [legacy]) == 3 + 3 + t("assistant") + t("f") + t("{}")
    refusal = {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}
    assert c.count_messages("gpt-4o", [refusal]) == 3 + 3 + t("assistant") + t("no")
    odd = {"role": "user", "content": {"weird": True}}
    assert c.count_messages("gpt-4o", [odd]) == 3 + 3 + t("user") + t('{"weird":true}')


def history(turns: int) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "You are a support agent."}]
    for i in range(turns):
        msgs.append({"role": "user", "content": f"question number {i} about order {1000 + i}"})
        msgs.append({"role": "assistant", "content": f"answer {i}: your order ships tomorrow"})
    return msgs


def test_second_count_of_same_history_does_not_re_encode() -> None:
    c = TokenCounter()
    msgs = history(20)
    first = c.count_messages("gpt-4o", msgs)
    calls_after_first = c.encode_calls
    assert calls_after_first > 0
    assert c.count_messages("gpt-4o", [dict(m) for m in msgs]) == first  # equal content, new objects
    assert c.encode_calls == calls_after_first
    assert c.cache_hits == len(msgs)


def test_next_turn_only_encodes_new_messages() -> None:
    c = TokenCounter()
    msgs = history(20)
    c.count_messages("gpt-4o", msgs)
    before = c.encode_calls
    msgs.append({"role": "user", "content": "one more"})
    c.count_messages("gpt-4o", msgs)
    assert c.encode_calls - before == 2  # role + content of the one new message
    # a different encoding is a different cache entry
    c.count_messages("gpt-4", msgs[:1])
    assert c.encode_calls - before == 4


def test_cache_is_bounded_lru() -> None:
    c = TokenCounter(max_cached=3)
    msgs = [{"role": "user", "content": f"m{i}"} for i in range(4)]
    for m in msgs[:3]:
        c.count_messages("gpt-4o", [m])
    c.count_messages("gpt-4o", [msgs[0]])  # refresh m0, so m1 is now the oldest
    c.count_messages("gpt-4o", [msgs[3]])  # evicts m1
    assert c.cache_size() == 3
    before = c.encode_calls
    c.count_messages("gpt-4o", [msgs[0]])
    assert c.encode_calls == before
    c.count_messages("gpt-4o", [msgs[1]])
    assert c.encode_calls == before + 2


def test_count_tools_cached_by_hash() -> None:
    c = TokenCounter()
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
        },
    ]
    assert c.count_tools("gpt-4o", None) == 0
    assert c.count_tools("gpt-4o", []) == 0
    n = c.count_tools("gpt-4o", tools)
    canonical = (
        '{"function":{"name":"get_weather","parameters":{"properties":{},"type":"object"}},"type":"function"}'
    )
    assert n == c.count_text("gpt-4o", canonical)
    before = c.encode_calls
    reordered = [
        {
            "function": {"parameters": {"properties": {}, "type": "object"}, "name": "get_weather"},
            "type": "function",
        }
    ]
    assert c.count_tools("gpt-4o", reordered) == n
    assert c.encode_calls == before


def test_warm_loads_both_encoders() -> None:
    c = TokenCounter()
    c.warm()
    assert c.encoder(O200K).name == O200K and c.encoder(CL100K).name == CL100K


def test_every_field_the_model_reads_is_counted() -> None:
    c = TokenCounter()
    base = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    description = "lorem ipsum dolor " * 2000
    plain = c.count_request("gpt-4o", base)
    fn = {"name": "f", "description": description, "parameters": {"type": "object"}}
    for extra in ({"tools": [{"type": "function", "function": fn}]}, {"functions": [fn]},
                  {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "description": description,
                                                                               "schema": {"type": "object"}}}}):
        assert c.count_request("gpt-4o", {**base, **extra}) > plain + 5000, extra.keys()
    # bookkeeping the model never reads is not counted
    assert c.count_request("gpt-4o", {**base, "metadata": {"note": description}, "user": description}) == plain


def test_large_requests_are_counted_off_the_loop_with_the_same_result() -> None:
    import asyncio

    c = TokenCounter()
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "words and more words " * 20_000}]}
    expected = TokenCounter().count_request("gpt-4o", body)
    assert asyncio.run(c.count_request_async("gpt-4o", body)) == expected
    assert c.offloaded == 1
    small = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    assert asyncio.run(c.count_request_async("gpt-4o", small)) == c.count_request("gpt-4o", small)
    assert c.offloaded == 1
    c.close()
