"""The cost governor's pure core: the ``cost:`` policy block, money arithmetic, ceilings and the ladder.

Money is integer micro-dollars (µ$). USD amounts written in YAML are converted through ``Decimal`` and
must be exact to 1 µ$. Prices are integer µ$ per million tokens; a token cost is rounded *up* to the next
µ$ once per request, so no request is ever billed less than its true cost.

Layered policies (org, team, key, route) each may carry a ``cost:`` block; :func:`combine` merges them
restrictively, so a lower layer can tighten but never loosen a higher one. :func:`rules.ceilings.ceilings_for`
turns the merged limits into concrete counters for one request (the shell reserves against them in the store).

The ladder reacts to *fill*, the highest used/limit ratio among the request's ceilings: every step whose
``at`` has been reached applies (downgrade maps merged, the smallest ``compress_to_tokens`` wins).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

Scope = Literal["request", "conversation", "key", "team", "org"]
WindowScope = Literal["key", "team", "org"]
Window = Literal["day", "month"]

MICRO_PER_USD = 1_000_000
TOKENS_PER_MTOK = 1_000_000


def _decimal(value: object) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    try:
        # repr gives a float's shortest decimal form: 0.05 -> Decimal("0.05"), not 0.05000000000000000277
        d = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation as e:
        raise ValueError(f"not a number: {value!r}") from e
    if not d.is_finite():
        raise ValueError(f"not a finite number: {value!r}")
    return d


def usd_to_micro(x: Decimal | int | float | str) -> int:
    """Exact USD -> integer µ$; raises ``ValueError`` for non-numbers and amounts finer than 1 µ$."""
    micro = _decimal(x) * MICRO_PER_USD
    if micro != micro.to_integral_value():
        raise ValueError(f"{x!r} USD is finer than 1 µ$")
    return int(micro)


def micro_to_usd_str(m: int) -> str:
    """Integer µ$ as a plain decimal USD string with 6 places: ``12345 -> "0.012345"``."""
    sign = "-" if m < 0 else ""
    whole, frac = divmod(abs(m), MICRO_PER_USD)
    return f"{sign}{whole}.{frac:06d}"


def cost_micro(tokens: int, per_mtok: int) -> int:
    """µ$ for ``tokens`` at ``per_mtok`` µ$ per million tokens, rounded up, in integers only."""
    if tokens < 0 or per_mtok < 0:
        raise ValueError("tokens and price must be >= 0")
    return -(-tokens * per_mtok // TOKENS_PER_MTOK)


def estimate_micro(prompt_tokens: int, output_bound: int, price_in: int, price_out: int) -> int:
    """Upper-bound cost of a request before it runs: the prompt at input price plus the output bound
    (``max_tokens`` or the model's output limit) at output price, rounded up once."""
    if min(prompt_tokens, output_bound, price_in, price_out) < 0:
        raise ValueError("tokens and prices must be >= 0")
    return -(-(prompt_tokens * price_in + output_bound * price_out) // TOKENS_PER_MTOK)


def _usage_int(usage: Mapping[str, Any], name: str) -> int:
    v = usage.get(name)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"usage.{name} must be a non-negative integer, got {v!r}")
    return v


def actual_micro(usage: Mapping[str, Any], price_in: int, price_out: int, price_cached: int) -> int:
    """Cost of a finished request from its OpenAI ``usage`` object, rounded up once.

    Cached prompt tokens (``prompt_tokens_details.cached_tokens``, capped at ``prompt_tokens``) are billed
    at the cached rate, the rest of the prompt at the input rate, and ``completion_tokens`` at the output
    rate. OpenAI's ``completion_tokens`` already includes ``completion_tokens_details.reasoning_tokens``,
    so reasoning is billed once, at the output rate. Raises ``ValueError`` on malformed counts so the
    shell can fall back to its estimate instead of billing zero.
    """
    prompt = _usage_int(usage, "prompt_tokens")
    completion = _usage_int(usage, "completion_tokens")
    details = usage.get("prompt_tokens_details")
    cached = min(_usage_int(details, "cached_tokens"), prompt) if isinstance(details, Mapping) else 0
    total = (prompt - cached) * price_in + cached * price_cached + completion * price_out
    return -(-total // TOKENS_PER_MTOK)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _positive_usd(value: object) -> Decimal:
    d = _decimal(value)
    if d <= 0:
        raise ValueError("must be > 0")
    usd_to_micro(d)
    return d


# USD as written in YAML (number or quoted string), > 0 and exact to 1 µ$
PositiveUsd = Annotated[Decimal, BeforeValidator(_positive_usd)]


class BudgetSpec(_Frozen):
    """One spend limit: a scope, a window (``window: day|month`` or ``minutes: N``) and USD."""

    scope: Scope
    window: Window | None = None
    minutes: int | None = Field(default=None, gt=0, strict=True)
    usd: PositiveUsd

    @model_validator(mode="after")
    def _window_fits_scope(self) -> BudgetSpec:
        windowed = self.scope in ("key", "team", "org")
        if windowed and (self.window is None) == (self.minutes is None):
            raise ValueError(f"scope {self.scope!r} needs exactly one of window (day|month) or minutes")
        if not windowed and (self.window is not None or self.minutes is not None):
            raise ValueError(f"scope {self.scope!r} takes no window or minutes")
        return self

    @property
    def micro(self) -> int:
        """The limit in µ$."""
        return usd_to_micro(self.usd)


class LadderRule(_Frozen):
    """Degrade as spend fills: at ``at`` (fill of the fullest ceiling) downgrade models and/or compress."""

    at: float = Field(gt=0, le=1, strict=True)
    downgrade: dict[str, str] | None = None
    compress_to_tokens: int | None = Field(default=None, gt=0, strict=True)

    @model_validator(mode="after")
    def _has_action(self) -> LadderRule:
        if self.downgrade is not None and not self.downgrade:
            raise ValueError("downgrade map must not be empty")
        if self.downgrade and any(not k or not v for k, v in self.downgrade.items()):
            raise ValueError("downgrade model names must not be empty")
        if self.downgrade is None and self.compress_to_tokens is None:
            raise ValueError("ladder step needs downgrade and/or compress_to_tokens")
        return self


class CompressSpec(_Frozen):
    """Compress a prompt above ``above_tokens`` down to ``to_tokens`` (whole earlier turns dropped)."""

    above_tokens: int = Field(gt=0, strict=True)
    to_tokens: int = Field(gt=0, strict=True)

    @model_validator(mode="after")
    def _shrinks(self) -> CompressSpec:
        if self.to_tokens >= self.above_tokens:
            raise ValueError("to_tokens must be < above_tokens")
        return self


class CostSpec(_Frozen):
    """A policy's ``cost:`` block, exactly as written in YAML."""

    per_request_usd: PositiveUsd | None = None
    per_conversation_usd: PositiveUsd | None = None
    budgets: tuple[BudgetSpec, ...] = ()
    ladder: tuple[LadderRule, ...] = ()
    compress: CompressSpec | None = None


@dataclass(frozen=True)
class BudgetLimit:
    """A windowed limit after :func:`combine`, in µ$."""

    scope: WindowScope
    window: Window | None
    minutes: int | None
    limit: int


@dataclass(frozen=True)
class EffectiveCost:
    """All cost limits that apply to one request, merged across policy layers."""

    per_request: int | None = None
    per_conversation: int | None = None
    budgets: tuple[BudgetLimit, ...] = ()
    ladder: tuple[LadderRule, ...] = ()
    compress: CompressSpec | None = None

    @property
    def unconstrained(self) -> bool:
        """True when nothing is limited, so the shell may skip the cost path entirely."""
        return (
            self.per_request is None
            and self.per_conversation is None
            and not self.budgets
            and not self.ladder
            and self.compress is None
        )


def _min_opt(a: int | None, b: int) -> int:
    return b if a is None else min(a, b)


def combine(specs: Sequence[CostSpec | None]) -> EffectiveCost:
    """Merge the ``cost:`` blocks of every policy layer that applies, most restrictive wins.

    Per-request and per-conversation limits (including ``budgets`` with scope request/conversation):
    the smallest set. Windowed budgets: all apply; the same scope+window twice keeps the smaller.
    Ladder: the union, sorted by ``at`` (steps at the same ``at`` all kept, in layer order).
    Compression: the rule with the smallest ``above_tokens`` (ties: smallest ``to_tokens``).
    """
    per_request: int | None = None
    per_conversation: int | None = None
    budgets: dict[tuple[str, str | None, int | None], BudgetLimit] = {}
    ladder: list[LadderRule] = []
    compress: CompressSpec | None = None
    for spec in specs:
        if spec is None:
            continue
        if spec.per_request_usd is not None:
            per_request = _min_opt(per_request, usd_to_micro(spec.per_request_usd))
        if spec.per_conversation_usd is not None:
            per_conversation = _min_opt(per_conversation, usd_to_micro(spec.per_conversation_usd))
        for b in spec.budgets:
            if b.scope == "request":
                per_request = _min_opt(per_request, b.micro)
            elif b.scope == "conversation":
                per_conversation = _min_opt(per_conversation, b.micro)
            else:
                k = (b.scope, b.window, b.minutes)
                old = budgets.get(k)
                if old is None or b.micro < old.limit:
                    budgets[k] = BudgetLimit(b.scope, b.window, b.minutes, b.micro)
        ladder.extend(spec.ladder)
        c = spec.compress
        if c is not None and (
            compress is None or (c.above_tokens, c.to_tokens) < (compress.above_tokens, compress.to_tokens)
        ):
            compress = c
    return EffectiveCost(
        per_request=per_request,
        per_conversation=per_conversation,
        budgets=tuple(budgets.values()),
        ladder=tuple(sorted(ladder, key=lambda r: r.at)),
        compress=compress,
    )


def check_per_request(eff: EffectiveCost, estimate: int) -> bool:
    """True when a request estimated at ``estimate`` µ$ is within the per-request limit (or none is set).

    False means the request must be refused before it reaches the model.
    """
    return eff.per_request is None or estimate <= eff.per_request


def fill_of(usages: Iterable[tuple[int, int]]) -> float:
    """The ladder's fill: the highest ``used / limit`` over ``(used, limit)`` pairs; 0.0 when none."""
    return max((used / limit for used, limit in usages if limit > 0), default=0.0)


@dataclass(frozen=True)
class LadderStep:
    """What the ladder imposes at a given fill: ``at`` of the highest step reached (None: none)."""

    at: float | None = None
    downgrade: Mapping[str, str] = field(default_factory=dict)
    compress_to_tokens: int | None = None

    def model_for(self, model: str) -> str:
        """``model`` after downgrades, following chains (a -> b, b -> c gives c) and stopping at cycles."""
        seen: set[str] = set()
        while model in self.downgrade and model not in seen:
            seen.add(model)
            model = self.downgrade[model]
        return model


def ladder_step(eff: EffectiveCost, fill: float) -> LadderStep:
    """The merged effect of every ladder step with ``at <= fill``.

    Downgrade maps merge in ``at`` order, so a higher step's mapping for the same model wins;
    the smallest ``compress_to_tokens`` among reached steps applies.
    """
    at: float | None = None
    downgrade: dict[str, str] = {}
    compress: int | None = None
    for rule in eff.ladder:
        if rule.at > fill:
            break
        at = rule.at
        if rule.downgrade:
            downgrade.update(rule.downgrade)
        if rule.compress_to_tokens is not None:
            compress = _min_opt(compress, rule.compress_to_tokens)
    return LadderStep(at=at, downgrade=downgrade, compress_to_tokens=compress)


def compress_target(eff: EffectiveCost, step: LadderStep, prompt_tokens: int) -> int | None:
    """Token target to compress the prompt to, or None when neither the ladder nor ``compress`` asks."""
    targets: list[int] = []
    if step.compress_to_tokens is not None and prompt_tokens > step.compress_to_tokens:
        targets.append(step.compress_to_tokens)
    if eff.compress is not None and prompt_tokens > eff.compress.above_tokens:
        targets.append(eff.compress.to_tokens)
    return min(targets, default=None)
