"""rules/cost.py: the cost: policy model, µ$ arithmetic, combination, ceilings/windows and the ladder."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
import yaml
from pydantic import ValidationError

from rules.ceilings import CONVERSATION_TTL_S, TTL_MARGIN_S, ceilings_for
from rules.cost import (
    BudgetLimit,
    BudgetSpec,
    CompressSpec,
    CostSpec,
    EffectiveCost,
    LadderRule,
    LadderStep,
    actual_micro,
    check_per_request,
    combine,
    compress_target,
    cost_micro,
    estimate_micro,
    fill_of,
    ladder_step,
    micro_to_usd_str,
    usd_to_micro,
)

GPT4O_IN = 2_500_000  # µ$ per million tokens ($2.50/Mtok)
GPT4O_OUT = 10_000_000
GPT4O_CACHED = 1_250_000

EXAMPLE = """
cost:
  per_request_usd: 0.05
  per_conversation_usd: 0.50
  budgets:
    - {scope: key, window: day, usd: 20}
    - {scope: team, window: month, usd: 500}
    - {scope: org, minutes: 60, usd: 100}      # rolling window of N minutes
  ladder:
    - {at: 0.8, downgrade: {gpt-4o: gpt-4o-mini}}
    - {at: 0.9, compress_to_tokens: 3000}
  compress: {above_tokens: 4000, to_tokens: 3000}
"""


def example() -> CostSpec:
    return CostSpec.model_validate(yaml.safe_load(EXAMPLE)["cost"])


# --- money -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usd", "micro"),
    [
        (0.05, 50_000),
        (0.1, 100_000),
        (20, 20_000_000),
        ("0.000001", 1),
        (Decimal("1.5"), 1_500_000),
        (-0.5, -500_000),
    ],
)
def test_usd_to_micro_is_exact(usd: object, micro: int) -> None:
    assert usd_to_micro(usd) == micro  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0.0000001, "abc", True, None, float("inf"), "NaN", [1]])
def test_usd_to_micro_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        usd_to_micro(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("micro", "text"), [(12_345, "0.012345"), (0, "0.000000"), (75_000_000, "75.000000"), (-1, "-0.000001")]
)
def test_micro_to_usd_str(micro: int, text: str) -> None:
    assert micro_to_usd_str(micro) == text


def test_cost_micro_rounds_up_in_integers() -> None:
    assert cost_micro(3_000, GPT4O_IN) == 7_500
    assert cost_micro(1, GPT4O_IN) == 3  # 2.5 µ$ -> 3
    assert cost_micro(1, 1) == 1
    assert cost_micro(0, GPT4O_IN) == 0
    with pytest.raises(ValueError):
        cost_micro(-1, GPT4O_IN)
    with pytest.raises(ValueError):
        cost_micro(1, -1)


def test_seed_arithmetic_input_only() -> None:
    # Assumption: 10,000 conversations/day, each sending 3,000 prompt tokens to gpt-4o, counted at the
    # input price only ($2.50 per million tokens), no output: 10,000 * 3,000 * 2.5e-6 = $75/day.
    per_conversation = estimate_micro(3_000, 0, GPT4O_IN, GPT4O_OUT)
    assert per_conversation == 7_500
    day = sum(per_conversation for _ in range(10_000))
    assert day == 75_000_000
    assert micro_to_usd_str(day) == "75.000000"


def test_seed_arithmetic_with_output() -> None:
    # Same 10,000 conversations, now also 500 output tokens each at $10/Mtok:
    # 3,000 * 2.5 + 500 * 10 = 7,500 + 5,000 = 12,500 µ$ each -> $125/day.
    per_conversation = estimate_micro(3_000, 500, GPT4O_IN, GPT4O_OUT)
    assert per_conversation == 12_500
    assert micro_to_usd_str(per_conversation * 10_000) == "125.000000"


def test_estimate_rounds_once_and_rejects_negatives() -> None:
    # 1 token in + 1 token out = 2.5 + 10 = 12.5 µ$ -> 13 (one rounding, not 3 + 10)
    assert estimate_micro(1, 1, GPT4O_IN, GPT4O_OUT) == 13
    with pytest.raises(ValueError):
        estimate_micro(-1, 0, GPT4O_IN, GPT4O_OUT)


def test_actual_micro_prices_cached_and_reasoning() -> None:
    usage = {
        "prompt_tokens": 10_000,
        "completion_tokens": 2_000,
        "prompt_tokens_details": {"cached_tokens": 4_000},
        "completion_tokens_details": {"reasoning_tokens": 1_500},
    }
    # 6,000 * 2.5 + 4,000 * 1.25 + 2,000 * 10 = 15,000 + 5,000 + 20,000 (reasoning inside completion)
    assert actual_micro(usage, GPT4O_IN, GPT4O_OUT, GPT4O_CACHED) == 40_000


def test_actual_micro_exact_sum_of_many_requests() -> None:
    usage = {"prompt_tokens": 1_234, "completion_tokens": 567}
    one = actual_micro(usage, GPT4O_IN, GPT4O_OUT, GPT4O_CACHED)
    assert one == 8_755  # 3,085 + 5,670
    assert sum(one for _ in range(1_000)) == 8_755_000


def test_actual_micro_edges() -> None:
    assert actual_micro({}, GPT4O_IN, GPT4O_OUT, GPT4O_CACHED) == 0
    assert (
        actual_micro({"prompt_tokens": None, "completion_tokens": 1}, GPT4O_IN, GPT4O_OUT, GPT4O_CACHED) == 10
    )
    # cached above prompt is capped; a non-dict details block is ignored
    capped = {"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 500}}
    assert actual_micro(capped, GPT4O_IN, GPT4O_OUT, GPT4O_CACHED) == 125
    odd = {"prompt_tokens": 100, "prompt_tokens_details": "x"}
    assert actual_micro(odd, GPT4O_IN, GPT4O_OUT, GPT4O_CACHED) == 250
    for bad in ({"prompt_tokens": -1}, {"prompt_tokens": "10"}, {"completion_tokens": True}):
        with pytest.raises(ValueError):
            actual_micro(bad, GPT4O_IN, GPT4O_OUT, GPT4O_CACHED)


# --- policy model ----------------------------------------------------------------------------------


def test_example_block_parses_exactly() -> None:
    spec = example()
    assert spec.per_request_usd == Decimal("0.05")
    assert [b.micro for b in spec.budgets] == [20_000_000, 500_000_000, 100_000_000]
    assert spec.budgets[2].minutes == 60 and spec.budgets[2].window is None
    assert spec.ladder[0].downgrade == {"gpt-4o": "gpt-4o-mini"}
    assert spec.compress == CompressSpec(above_tokens=4000, to_tokens=3000)
    with pytest.raises(ValidationError):
        spec.per_request_usd = Decimal(1)


def test_quoted_usd_string_is_accepted() -> None:
    assert CostSpec(per_request_usd="0.10").per_request_usd == Decimal("0.10")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "block",
    [
        {"per_request_usd": 0},
        {"per_request_usd": -1},
        {"per_request_usd": 0.0000001},
        {"per_conversation_usd": True},
        {"per_request_usd": 1, "typo": 1},
        {"budgets": [{"scope": "key", "usd": 1}]},
        {"budgets": [{"scope": "key", "window": "day", "minutes": 5, "usd": 1}]},
        {"budgets": [{"scope": "key", "window": "week", "usd": 1}]},
        {"budgets": [{"scope": "key", "minutes": 0, "usd": 1}]},
        {"budgets": [{"scope": "key", "minutes": "60", "usd": 1}]},
        {"budgets": [{"scope": "conversation", "window": "day", "usd": 1}]},
        {"budgets": [{"scope": "request", "minutes": 5, "usd": 1}]},
        {"budgets": [{"scope": "user", "window": "day", "usd": 1}]},
        {"budgets": [{"scope": "team", "window": "day", "usd": 0}]},
        {"ladder": [{"at": 0, "downgrade": {"a": "b"}}]},
        {"ladder": [{"at": 1.01, "downgrade": {"a": "b"}}]},
        {"ladder": [{"at": True, "downgrade": {"a": "b"}}]},
        {"ladder": [{"at": 0.5}]},
        {"ladder": [{"at": 0.5, "downgrade": {}}]},
        {"ladder": [{"at": 0.5, "downgrade": {"a": ""}}]},
        {"ladder": [{"at": 0.5, "compress_to_tokens": 0}]},
        {"compress": {"above_tokens": 3000, "to_tokens": 3000}},
        {"compress": {"above_tokens": 3000, "to_tokens": 0}},
    ],
)
def test_invalid_blocks_fail_at_load(block: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        CostSpec.model_validate(block)


def test_at_one_and_integer_at_are_valid() -> None:
    assert LadderRule.model_validate({"at": 1, "compress_to_tokens": 10}).at == 1.0


# --- combine ---------------------------------------------------------------------------------------


def test_combine_empty_is_unconstrained() -> None:
    eff = combine([None, CostSpec()])
    assert eff == EffectiveCost()
    assert eff.unconstrained
    assert not combine([example()]).unconstrained


@pytest.mark.parametrize(
    "field",
    ["per_request", "per_conversation", "budgets", "ladder", "compress"],
)
def test_unconstrained_false_for_each_field(field: str) -> None:
    values: dict[str, object] = {
        "per_request": 1,
        "per_conversation": 1,
        "budgets": (BudgetLimit("key", "day", None, 1),),
        "ladder": (LadderRule(at=0.5, compress_to_tokens=1),),
        "compress": CompressSpec(above_tokens=2, to_tokens=1),
    }
    assert not EffectiveCost(**{field: values[field]}).unconstrained  # type: ignore[arg-type]


def test_team_cannot_loosen_org_min_wins() -> None:
    org = CostSpec.model_validate(
        {
            "per_request_usd": 0.05,
            "per_conversation_usd": 0.5,
            "budgets": [{"scope": "team", "window": "month", "usd": 500}],
        }
    )
    team = CostSpec.model_validate(
        {
            "per_request_usd": 1.0,  # looser: ignored
            "per_conversation_usd": 0.25,  # tighter: wins
            "budgets": [
                {"scope": "team", "window": "month", "usd": 5000},  # looser: ignored
                {"scope": "key", "window": "day", "usd": 20},
            ],
        }
    )
    for order in ([org, team], [team, org]):
        eff = combine(order)
        assert eff.per_request == 50_000
        assert eff.per_conversation == 250_000
        limits = {(b.scope, b.window): b.limit for b in eff.budgets}
        assert limits == {("team", "month"): 500_000_000, ("key", "day"): 20_000_000}


def test_combine_folds_request_and_conversation_budgets() -> None:
    spec = CostSpec.model_validate(
        {
            "per_request_usd": 0.5,
            "budgets": [
                {"scope": "request", "usd": 0.1},
                {"scope": "conversation", "usd": 2},
                {"scope": "conversation", "usd": 1},
            ],
        }
    )
    eff = combine([spec])
    assert (eff.per_request, eff.per_conversation, eff.budgets) == (100_000, 1_000_000, ())


def test_combine_keeps_distinct_windows_apart() -> None:
    spec = CostSpec.model_validate(
        {
            "budgets": [
                {"scope": "org", "minutes": 60, "usd": 100},
                {"scope": "org", "minutes": 5, "usd": 10},
                {"scope": "org", "window": "day", "usd": 1000},
                {"scope": "org", "minutes": 60, "usd": 50},
            ]
        }
    )
    eff = combine([spec])
    assert [(b.window, b.minutes, b.limit) for b in eff.budgets] == [
        (None, 60, 50_000_000),
        (None, 5, 10_000_000),
        ("day", None, 1_000_000_000),
    ]


def test_combine_ladder_union_and_compress_choice() -> None:
    a = CostSpec.model_validate(
        {
            "ladder": [{"at": 0.9, "compress_to_tokens": 3000}, {"at": 0.5, "downgrade": {"x": "y"}}],
            "compress": {"above_tokens": 8000, "to_tokens": 4000},
        }
    )
    b = CostSpec.model_validate(
        {
            "ladder": [{"at": 0.5, "downgrade": {"x": "z"}}],
            "compress": {"above_tokens": 4000, "to_tokens": 3000},
        }
    )
    c = CostSpec.model_validate({"compress": {"above_tokens": 4000, "to_tokens": 2000}})
    d = CostSpec.model_validate({"compress": {"above_tokens": 4000, "to_tokens": 3500}})
    eff = combine([a, b, c, d])
    assert [(r.at, r.downgrade, r.compress_to_tokens) for r in eff.ladder] == [
        (0.5, {"x": "y"}, None),
        (0.5, {"x": "z"}, None),
        (0.9, None, 3000),
    ]
    assert eff.compress == CompressSpec(above_tokens=4000, to_tokens=2000)


# --- ceilings and windows --------------------------------------------------------------------------


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()


def test_ceilings_for_example() -> None:
    now = datetime(2026, 11, 25, 13, 30, 5, tzinfo=UTC)
    got = ceilings_for(
        combine([example()]),
        key_id="support-agent",
        team="support",
        org="default",
        conversation="c-1",
        now=now,
    )
    bucket = int(now.timestamp()) // 3600
    assert [(c.key, c.limit, c.scope, c.window) for c in got] == [
        ("conversation:c-1", 500_000, "conversation", None),
        ("key:support-agent:day:2026-11-25", 20_000_000, "key", "day"),
        ("team:support:month:2026-11", 500_000_000, "team", "month"),
        (f"org:default:m60:{bucket}", 100_000_000, "org", "m60"),
    ]
    assert got[0].reset_at is None and got[0].ttl_s == CONVERSATION_TTL_S
    assert got[1].reset_at == ts(2026, 11, 26) and got[1].ttl_s == 86_400 + TTL_MARGIN_S
    assert got[2].reset_at == ts(2026, 12, 1) and got[2].ttl_s == 30 * 86_400 + TTL_MARGIN_S
    assert got[3].reset_at == ts(2026, 11, 25, 14) and got[3].ttl_s == 3_600 + TTL_MARGIN_S


def _windows(now: datetime) -> dict[str, tuple[str, float | None]]:
    eff = combine([example()])
    got = ceilings_for(eff, key_id="k", team="t", org="o", conversation=None, now=now)
    return {c.scope: (c.key, c.reset_at) for c in got}


def test_year_boundary_dec31_to_jan1() -> None:
    before = _windows(datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC))
    after = _windows(datetime(2027, 1, 1, 0, 0, 0, tzinfo=UTC))
    assert before["key"] == ("key:k:day:2026-12-31", ts(2027, 1, 1))
    assert before["team"] == ("team:o/t:month:2026-12", ts(2027, 1, 1))
    assert after["key"] == ("key:k:day:2027-01-01", ts(2027, 1, 2))
    assert after["team"] == ("team:o/t:month:2027-01", ts(2027, 2, 1))
    assert before["org"][1] == ts(2027, 1, 1)
    assert after["org"][1] == ts(2027, 1, 1, 1)


@pytest.mark.parametrize(("org", "team", "counter"), [
    ("default", "support", "team:support:"), (None, "support", "team:support:"),
    ("acme", "support", "team:acme/support:"), ("default", "acme/support", "team:acme%2Fsupport:"),
    ("a:b", "c", "team:a%3Ab/c:"), ("a/b", "c", "team:a%2Fb/c:"), ("a", "b/c", "team:a/b%2Fc:"),
])
def test_teams_are_identified_with_their_org(org: str | None, team: str, counter: str) -> None:
    eff = combine([CostSpec.model_validate({"budgets": [{"scope": "team", "window": "day", "usd": 1}]})])
    (c,) = ceilings_for(eff, key_id="k", team=team, org=org, conversation=None,
                        now=datetime(2026, 12, 1, tzinfo=UTC))
    assert c.key.startswith(counter)


def test_month_lengths_in_ttl() -> None:
    eff = combine([CostSpec.model_validate({"budgets": [{"scope": "team", "window": "month", "usd": 1}]})])
    feb = ceilings_for(
        eff, key_id="k", team="t", org=None, conversation=None, now=datetime(2028, 2, 29, tzinfo=UTC)
    )
    assert feb[0].key == "team:t:month:2028-02"
    assert feb[0].ttl_s == 29 * 86_400 + TTL_MARGIN_S
    assert feb[0].reset_at == ts(2028, 3, 1)


def test_non_utc_now_is_converted_to_utc() -> None:
    # 23:30 on Nov 25 at UTC-5 is 04:30 on Nov 26 UTC
    now = datetime(2026, 11, 25, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
    assert _windows(now)["key"][0] == "key:k:day:2026-11-26"


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError):
        ceilings_for(
            EffectiveCost(), key_id="k", team=None, org=None, conversation=None, now=datetime(2026, 1, 1)
        )


def test_rolling_buckets_are_epoch_aligned() -> None:
    eff = combine([CostSpec.model_validate({"budgets": [{"scope": "key", "minutes": 15, "usd": 1}]})])

    def one(now: datetime) -> tuple[str, float | None]:
        (c,) = ceilings_for(eff, key_id="k", team=None, org=None, conversation=None, now=now)
        return c.key, c.reset_at

    start = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    bucket = int(start.timestamp()) // 900
    assert one(start) == (f"key:k:m15:{bucket}", ts(2026, 11, 25, 10, 15))
    assert one(start + timedelta(minutes=14, seconds=59, microseconds=999_999))[0] == f"key:k:m15:{bucket}"
    assert one(start + timedelta(minutes=15)) == (f"key:k:m15:{bucket + 1}", ts(2026, 11, 25, 10, 30))


def test_missing_owner_or_conversation_yields_no_counter() -> None:
    got = ceilings_for(
        combine([example()]), key_id="k", team=None, org=None, conversation=None, now=datetime.now(UTC)
    )
    assert [c.scope for c in got] == ["key"]


def test_ids_with_colons_cannot_alias() -> None:
    eff = combine([CostSpec.model_validate({"budgets": [{"scope": "key", "window": "day", "usd": 1}]})])
    now = datetime(2026, 11, 25, tzinfo=UTC)
    (c,) = ceilings_for(eff, key_id="a:day:2026-11-25", team=None, org=None, conversation=None, now=now)
    assert c.key == "key:a%3Aday%3A2026-11-25:day:2026-11-25"
    (c,) = ceilings_for(eff, key_id="50%", team=None, org=None, conversation=None, now=now)
    assert c.key == "key:50%25:day:2026-11-25"


# --- per-request, fill, ladder ---------------------------------------------------------------------


def test_check_per_request() -> None:
    eff = combine([example()])
    assert check_per_request(eff, 50_000)
    assert not check_per_request(eff, 50_001)
    assert check_per_request(EffectiveCost(), 10**12)


def test_fill_of() -> None:
    assert fill_of([]) == 0.0
    assert fill_of([(80, 100), (10, 1000), (5, 0)]) == 0.8
    assert fill_of([(150, 100)]) == 1.5


def test_ladder_steps() -> None:
    eff = combine([example()])
    assert ladder_step(eff, 0.0) == LadderStep()
    assert ladder_step(eff, 0.79) == LadderStep()
    at_80 = ladder_step(eff, 0.8)
    assert at_80 == LadderStep(at=0.8, downgrade={"gpt-4o": "gpt-4o-mini"}, compress_to_tokens=None)
    assert at_80.model_for("gpt-4o") == "gpt-4o-mini"
    assert at_80.model_for("claude") == "claude"
    at_95 = ladder_step(eff, 0.95)
    assert at_95 == LadderStep(at=0.9, downgrade={"gpt-4o": "gpt-4o-mini"}, compress_to_tokens=3000)


def test_ladder_merge_order_smallest_compress_and_chains() -> None:
    spec = CostSpec.model_validate(
        {
            "ladder": [
                {"at": 0.5, "downgrade": {"a": "b"}, "compress_to_tokens": 5000},
                {"at": 0.7, "downgrade": {"b": "c", "x": "y"}, "compress_to_tokens": 2000},
                {"at": 0.9, "downgrade": {"x": "z", "c": "a"}, "compress_to_tokens": 4000},
            ]
        }
    )
    step = ladder_step(combine([spec]), 1.0)
    assert step.at == 0.9
    assert step.downgrade == {"a": "b", "b": "c", "x": "z", "c": "a"}  # higher at wins for "x"
    assert step.compress_to_tokens == 2000
    assert step.model_for("x") == "z"
    # a -> b -> c -> a is a cycle: stop when a model repeats
    assert step.model_for("a") == "a"
    assert ladder_step(combine([spec]), 0.7).model_for("a") == "c"


def test_compress_target() -> None:
    eff = combine([example()])
    none = LadderStep()
    assert compress_target(eff, none, 4000) is None
    assert compress_target(eff, none, 4001) == 3000
    tight = LadderStep(at=0.9, compress_to_tokens=2000)
    assert compress_target(eff, tight, 2500) == 2000
    assert compress_target(eff, tight, 1500) is None
    assert compress_target(EffectiveCost(), tight, 2500) == 2000
    assert compress_target(EffectiveCost(), LadderStep(at=0.9, compress_to_tokens=5000), 4500) is None
    loose = LadderStep(at=0.9, compress_to_tokens=3500)
    assert compress_target(eff, loose, 5000) == 3000


def test_budget_spec_micro_property() -> None:
    assert BudgetSpec(scope="org", minutes=60, usd=Decimal("100.25")).micro == 100_250_000
