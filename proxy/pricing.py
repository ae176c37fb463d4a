"""Model prices in integer micro-dollars, from litellm's bundled price map plus config overrides.

litellm ships ``model_prices_and_context_window_backup.json`` inside its package. Importing litellm
costs seconds, so the file is located through ``importlib.util.find_spec`` (which does not execute
the package) and read once with orjson.

Prices are integer µ$ per million tokens. litellm writes USD per token as floats (``2.5e-06``); each is
converted through ``Decimal(repr(x))`` so the float's shortest decimal form is used, and scaled by
10**12. The few entries that are not a whole µ$/Mtok (a handful of vendor prices such as
``2.9999900000000002e-06``) are rounded up, so the proxy never under-charges. Overrides from config are
USD per million tokens and must be exact to the µ$; anything finer is a config error.

A model is *priced* when its entry carries ``input_cost_per_token`` and ``output_cost_per_token``
(embedding entries may omit the output price, which is then 0). Anything else looks up as ``None``
and the caller refuses with ``unpriced_model``. A configured price of $0 is a real price of zeros.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

import orjson

PRICE_FILE = "model_prices_and_context_window_backup.json"
_OVERRIDE_FIELDS = frozenset(
    {"input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "max_output_tokens", "max_input_tokens"}
)


@dataclass(frozen=True)
class Price:
    """Integer µ$ per million tokens, plus the model's token limits when known."""

    input_per_mtok: int
    output_per_mtok: int
    cached_input_per_mtok: int
    max_output_tokens: int | None
    max_input_tokens: int | None


def litellm_package_dir() -> str | None:
    """Directory of the installed litellm package, found without importing it."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(list(spec.submodule_search_locations)[0])


def load_litellm_price_map(path: str | None = None) -> dict[str, Any]:
    """Read litellm's bundled price map (or ``path``) as a plain dict; ``{}`` if litellm is absent."""
    if path is None:
        pkg = litellm_package_dir()
        if pkg is None:
            return {}
        path = os.path.join(pkg, PRICE_FILE)
    with open(path, "rb") as f:
        data = orjson.loads(f.read())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: price map is not a JSON object")
    return data


def _per_token_to_micro_per_mtok(x: object) -> int | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x < 0:
        return None
    return int((Decimal(repr(x)) * 10**12).to_integral_value(rounding=ROUND_CEILING))


def _opt_int(x: object) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and x > 0 else None


def price_from_litellm_entry(entry: object) -> Price | None:
    """One litellm map entry as a :class:`Price`, or ``None`` when it carries no usable token price."""
    if not isinstance(entry, Mapping):
        return None
    inp = _per_token_to_micro_per_mtok(entry.get("input_cost_per_token"))
    if inp is None:
        return None
    out = _per_token_to_micro_per_mtok(entry.get("output_cost_per_token"))
    if out is None:
        if "output_cost_per_token" in entry or entry.get("mode") != "embedding":
            return None
        out = 0
    cached = _per_token_to_micro_per_mtok(entry.get("cache_read_input_token_cost"))
    return Price(
        input_per_mtok=inp,
        output_per_mtok=out,
        # no cache price listed: bill cached tokens at the full input rate rather than guess a discount
        cached_input_per_mtok=inp if cached is None else cached,
        max_output_tokens=_opt_int(entry.get("max_output_tokens")),
        max_input_tokens=_opt_int(entry.get("max_input_tokens")),
    )


def usd_per_mtok_to_micro(value: object, *, field: str) -> int:
    """A config price in USD per million tokens (as written in YAML) to exact integer µ$ per Mtok."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError(f"{field}: expected a number, got {type(value).__name__}")
    try:
        d = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation as e:
        raise ValueError(f"{field}: not a number: {value!r}") from e
    if not d.is_finite() or d < 0:
        raise ValueError(f"{field}: must be a finite number >= 0, got {value!r}")
    micro = d * 10**6
    if micro != micro.to_integral_value():
        raise ValueError(f"{field}: {value!r} USD/Mtok is finer than 1 µ$ per million tokens")
    return int(micro)


def _override_fields(raw: object) -> dict[str, Any]:
    if isinstance(raw, Mapping):
        fields = dict(raw)
    elif hasattr(raw, "model_dump"):
        fields = dict(raw.model_dump())
    else:
        raise ValueError(f"price override must be a mapping, got {type(raw).__name__}")
    return {k: v for k, v in fields.items() if v is not None}


def price_from_override(model: str, raw: object, base: Price | None) -> Price:
    """A :class:`Price` from a config override; token limits fall back to the litellm entry."""
    fields = _override_fields(raw)
    unknown = set(fields) - _OVERRIDE_FIELDS
    if unknown:
        raise ValueError(f"price override for {model!r}: unknown field(s) {sorted(unknown)}")
    for required in ("input_per_mtok", "output_per_mtok"):
        if required not in fields:
            raise ValueError(f"price override for {model!r}: {required} is required")
    inp = usd_per_mtok_to_micro(fields["input_per_mtok"], field=f"{model}.input_per_mtok")
    out = usd_per_mtok_to_micro(fields["output_per_mtok"], field=f"{model}.output_per_mtok")
    cached = (
        usd_per_mtok_to_micro(fields["cached_input_per_mtok"], field=f"{model}.cached_input_per_mtok")
        if "cached_input_per_mtok" in fields
        else inp
    )
    max_out = _opt_int(fields.get("max_output_tokens"))
    max_in = _opt_int(fields.get("max_input_tokens"))
    return Price(
        input_per_mtok=inp,
        output_per_mtok=out,
        cached_input_per_mtok=cached,
        max_output_tokens=max_out if max_out is not None or base is None else base.max_output_tokens,
        max_input_tokens=max_in if max_in is not None or base is None else base.max_input_tokens,
    )


def _candidates(model: str) -> list[str]:
    # "openrouter/openai/gpt-4o" -> itself, "openai/gpt-4o", "gpt-4o"
    parts = model.split("/")
    return ["/".join(parts[i:]) for i in range(len(parts)) if parts[i]]


class PriceBook:
    """Immutable model -> :class:`Price` lookup; a configured override wins over the litellm map."""

    __slots__ = ("_map", "_overrides")

    def __init__(self, base: Mapping[str, Price], overrides: Mapping[str, Price]) -> None:
        self._map = dict(base)
        self._overrides = dict(overrides)

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, object] | None = None,
        *,
        price_map: Mapping[str, Any] | None = None,
    ) -> PriceBook:
        """Build from litellm's bundled map (read now, unless ``price_map`` is given) plus overrides.

        ``overrides`` maps a model/route name to ``{input_per_mtok, output_per_mtok,
        cached_input_per_mtok?, max_output_tokens?, max_input_tokens?}`` in USD per million tokens.
        Raises ``ValueError`` on a malformed override.
        """
        raw = load_litellm_price_map() if price_map is None else price_map
        base: dict[str, Price] = {}
        for name, entry in raw.items():
            if name == "sample_spec":
                continue
            p = price_from_litellm_entry(entry)
            if p is not None:
                base[name] = p
        book = cls(base, {})
        return book.with_overrides(overrides or {})

    def with_overrides(self, overrides: Mapping[str, object]) -> PriceBook:
        """A new book sharing this one's litellm prices, with ``overrides`` replacing the old ones.

        Lets a policy reload re-price routes without reading the price file again.
        """
        parsed = {m: price_from_override(m, raw, self._lookup_map(m)) for m, raw in overrides.items()}
        book = PriceBook.__new__(PriceBook)
        book._map = self._map
        book._overrides = parsed
        return book

    def _lookup_map(self, model: str) -> Price | None:
        for name in _candidates(model):
            if name in self._map:
                return self._map[name]
        return None

    def lookup(self, model: str) -> Price | None:
        """Price of ``model``: exact name, then with leading ``provider/`` segments stripped; else None."""
        names = _candidates(model)
        for name in names:
            if name in self._overrides:
                return self._overrides[name]
        for name in names:
            if name in self._map:
                return self._map[name]
        return None
