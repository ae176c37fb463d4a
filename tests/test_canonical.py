"""Canonical forms: equal JSON values give equal call keys, different values different keys."""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules.canonical import call_key, canonical_json, canonical_value
from rules.strictjson import loads_strict


def key_of(text: str, tool: str = "apply_credit") -> str:
    return call_key(tool, loads_strict(text), text)


# --- canonical_json (schema hashing) ----------------------------------------------------------------

def test_canonical_json_sorts_keys_and_drops_whitespace() -> None:
    value = {"b": 1, "a": {"d": [1, 2.5], "c": "é"}}
    assert canonical_json(value) == '{"a":{"c":"é","d":[1,2.5]},"b":1}'.encode()


def test_canonical_json_accepts_any_mapping() -> None:
    assert canonical_json(MappingProxyType({"b": MappingProxyType({"z": 1, "y": 2}), "a": 1})) == (
        b'{"a":1,"b":{"y":2,"z":1}}'
    )


def test_canonical_json_refuses_non_json_values() -> None:
    with pytest.raises(TypeError, match="not JSON serializable: set"):
        canonical_json({"a": {1, 2}})


# --- call keys ----------------------------------------------------------------------------------------

def test_call_key_is_sha256_of_tool_newline_canonical_value() -> None:
    expected = hashlib.sha256(b'refund\n{"amount":1,"to":"x"}').hexdigest()
    assert key_of('{"to": "x", "amount": 1}', "refund") == expected


def test_call_key_separates_tool_and_arguments() -> None:
    assert key_of('{"a": 1}', "refund") != key_of('{"a": 1}', "refunds")
    assert key_of('{"a": 1}') != key_of('{"a": 2}')
    assert call_key("a", "b", '"b"') != call_key("a\n", "b", '"b"')


@pytest.mark.parametrize("spelling", ["20", "20.0", "2e1", "20.00", "2.0E+1", "200e-1", "20.000000000000000000"])
def test_one_number_many_spellings(spelling: str) -> None:
    assert key_of('{"customer_id": "c-1", "amount": ' + spelling + "}") == key_of(
        '{"amount": 20, "customer_id": "c-1"}')


def test_numbers_are_compared_exactly_not_as_doubles() -> None:
    # 2^53 + 1 cannot be a double: written as an integer and with a fraction it is still one number,
    # and it is not 2^53.
    assert key_of('{"n": 9007199254740993}') == key_of('{"n": 9007199254740993.0}')
    assert key_of('{"n": 9007199254740993.0}') != key_of('{"n": 9007199254740992}')
    assert key_of('{"n": 0.1}') != key_of('{"n": 0.10000000000000001}')
    assert key_of('{"n": -0.0}') == key_of('{"n": 0}')


def test_strings_stay_strings() -> None:
    assert key_of('{"amount": "20"}') != key_of('{"amount": 20}')
    assert key_of('{"amount": "20.0"}') != key_of('{"amount": "20"}')
    assert key_of('{"b": true}') != key_of('{"b": 1}')
    assert key_of('{"b": null}') != key_of('{"b": 0}')


# --- the property ------------------------------------------------------------------------------------

Value = Any
numbers = st.one_of(
    st.integers(min_value=-10**30, max_value=10**30),
    st.builds(lambda m, e: Fraction(m) * Fraction(10) ** e, st.integers(min_value=-10**20, max_value=10**20),
              st.integers(min_value=-30, max_value=10)),
)
scalars = st.one_of(st.none(), st.booleans(), st.text(max_size=8), numbers)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=16)


def _exact(n: Any) -> Fraction | None:
    """The exact value of a generated number, or None when it is not a number of finite decimal spelling."""
    if isinstance(n, bool) or not isinstance(n, int | Fraction):
        return None
    f = Fraction(n)
    d = f.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    return f if d == 1 else None


def _digits(f: Fraction) -> str:
    """A plain decimal spelling of a fraction whose denominator divides a power of ten."""
    sign = "-" if f < 0 else ""
    f = abs(f)
    scale = 0
    while (f * 10**scale).denominator != 1:
        scale += 1
    whole = f.numerator * 10**scale // f.denominator
    text = str(whole).rjust(scale + 1, "0")
    return sign + (text[:-scale] + "." + text[-scale:] if scale else text)


def spell(value: Value, draw: Any) -> str:
    """Random JSON text for ``value``: key order, whitespace and number spellings all vary."""
    ws = draw(st.sampled_from(["", " ", "\n", "\t "]))
    if isinstance(value, dict):
        keys = draw(st.permutations(list(value)))
        return "{" + ws + ",".join(json.dumps(k) + ws + ":" + spell(value[k], draw) for k in keys) + ws + "}"
    if isinstance(value, list):
        return "[" + ws + ("," + ws).join(spell(v, draw) for v in value) + "]"
    f = _exact(value)
    if f is None:
        return json.dumps(value)
    plain = _digits(f)
    shift = draw(st.integers(min_value=-3, max_value=3))
    form = draw(st.sampled_from(["plain", "zeros", "exp"]))
    if form == "zeros":
        return plain + ("" if "." in plain else ".") + "0" * draw(st.integers(min_value=1, max_value=3))
    if form == "exp":
        return _digits(f / Fraction(10) ** shift) + draw(st.sampled_from(["e", "E", "e+"])).replace(
            "e+", "e+" if shift >= 0 else "e") + str(shift)
    return plain


def normal(value: Value) -> Value:
    """The value the spellings denote: numbers as exact fractions."""
    if isinstance(value, dict):
        return {k: normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normal(v) for v in value]
    f = _exact(value)
    return ("num", f) if f is not None else value


@settings(max_examples=300, deadline=None)
@given(value=values, data=st.data())
def test_equal_json_values_give_equal_keys(value: Value, data: Any) -> None:
    a = spell(value, data.draw)
    b = spell(value, data.draw)
    assert call_key("t", loads_strict(a), a) == call_key("t", loads_strict(b), b)


@settings(max_examples=300, deadline=None)
@given(x=values, y=values, data=st.data())
def test_different_json_values_give_different_keys(x: Value, y: Value, data: Any) -> None:
    a, b = spell(x, data.draw), spell(y, data.draw)
    same = normal(x) == normal(y)
    assert (call_key("t", loads_strict(a), a) == call_key("t", loads_strict(b), b)) == same


def test_canonical_value_spells_integers_plainly() -> None:
    assert canonical_value(loads_strict('{"a": 2E+1, "b": [1.50, 1e-7]}'), '{"a": 2E+1, "b": [1.50, 1e-7]}') == (
        b'{"a":20,"b":[1.5,1E-7]}')
