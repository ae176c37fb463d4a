"""Strict JSON parsing: every refusal reason, its path, and the accepted cases."""

from __future__ import annotations

from typing import Any

import pytest

from rules.strictjson import REASONS, StrictJSONError, loads_strict


def refusal(text: str | bytes, **limits: int) -> StrictJSONError:
    with pytest.raises(StrictJSONError) as info:
        loads_strict(text, **limits)
    assert info.value.reason in REASONS
    return info.value


def nested(depth: int) -> str:
    """``depth`` nested arrays around a number: depth 3 is ``[[[1]]]``."""
    return "[" * depth + "1" + "]" * depth


# --- accepted ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"amount": 1500, "to": "bob"}', {"amount": 1500, "to": "bob"}),
        ("[]", []),
        ("{}", {}),
        ("1", 1),
        ("-0.5e2", -50.0),
        ('"hi"', "hi"),
        ("true", True),
        ("null", None),
        ('  {"a" : [1, {"b": null}] }\n', {"a": [1, {"b": None}]}),
        ('{"url": "https://x.io:8/a", "at": "10:00:00"}', {"url": "https://x.io:8/a", "at": "10:00:00"}),
        ('{"a": 1, "A": 2}', {"a": 1, "A": 2}),
        ('[{"a": 1}, {"a": 2}]', [{"a": 1}, {"a": 2}]),
        ('{"a": {"a": {"a": 1}}}', {"a": {"a": {"a": 1}}}),
    ],
)
def test_accepts_valid_json(text: str, expected: Any) -> None:
    assert loads_strict(text) == expected
    assert loads_strict(text.encode()) == expected


def test_accepts_unicode_text_and_escapes() -> None:
    text = '{"名前": "Zoë 😀", "esc": "\\u00e9\\ud83d\\ude00\\n", "rtl": "مرحبا"}'
    assert loads_strict(text) == {"名前": "Zoë 😀", "esc": "é😀\n", "rtl": "مرحبا"}
    assert loads_strict(text.encode("utf-8")) == loads_strict(text)


def test_escaped_colons_without_duplicates_are_accepted() -> None:
    # \u003a decodes to ':' and defeats the cheap colon count, forcing the exact check.
    assert loads_strict('{"a": "x\\u003ay", "b": {"c": ":"}}') == {"a": "x:y", "b": {"c": ":"}}


def test_many_containers_within_depth_are_accepted() -> None:
    text = "[" + ",".join(['{"k": [1]}'] * 40) + "]"  # 81 brackets, depth 3
    assert len(loads_strict(text, max_depth=3)) == 40


def test_big_integer_becomes_float() -> None:
    # Documented orjson behaviour: magnitude (and limit comparisons) survive.
    assert loads_strict("18446744073709551616") == pytest.approx(1.8446744073709552e19)


# --- invalid_json -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", "   ", "{", '{"a":1', "[1,]", '{"a" 1}', "{'a': 1}", '"a\x01"', "01", "\ufeff{}", "nul", "[1 2]"],
)
def test_rejects_invalid_json(text: str) -> None:
    err = refusal(text)
    assert (err.reason, err.path) == ("invalid_json", "")
    assert str(err).startswith("invalid JSON: ")


@pytest.mark.parametrize("text", ['{"a": 1} x', '{"a": 1}{"b": 2}', "1 2", '"a" "b"', "[] ,"])
def test_rejects_trailing_garbage(text: str) -> None:
    err = refusal(text)
    assert err.reason == "invalid_json"
    assert "after document" in str(err)


def test_rejects_invalid_utf8_bytes() -> None:
    assert refusal(b'{"a": "\xff"}').reason == "invalid_json"


@pytest.mark.parametrize("text", ['"\\ud800"', '"\\udc00"', '["\\ud83d x"]'])
def test_rejects_escaped_lone_surrogates(text: str) -> None:
    assert refusal(text).reason == "invalid_json"


def test_rejects_raw_lone_surrogate_in_str() -> None:
    err = refusal('{"a": "\ud800"}')
    assert err.reason == "invalid_json"
    assert str(err) == "invalid JSON: lone surrogate in input"


def test_deep_invalid_input_is_invalid_json_not_a_crash() -> None:
    # orjson accepts this depth but fails at the end; the stdlib re-parse used to look for
    # NaN overflows Python's recursion limit, which must not escape.
    assert refusal("[" * 1010 + "]" * 1009, max_depth=2000).reason == "invalid_json"


# --- non_finite_number ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["NaN", "Infinity", "-Infinity", '{"a": NaN}', '{"a": [1, Infinity]}', '[-Infinity]', "1e400", "-1e400",
     '{"x": 1' + "0" * 400 + "}"],
)
def test_rejects_non_finite_numbers(text: str) -> None:
    err = refusal(text)
    assert (err.reason, err.path) == ("non_finite_number", "")
    assert str(err).startswith("non-finite number (NaN, Infinity or out of range) near line 1 column ")


def test_non_finite_message_gives_the_position() -> None:
    expected = "non-finite number (NaN, Infinity or out of range) near line 2 column 3"
    assert str(refusal('{"a":\n  NaN}')) == expected


# --- duplicate_key ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('{"amount": 1, "amount": 500}', "/amount"),
        ('{"a": {"b": 1, "c": 2, "b": 3}}', "/a/b"),
        ('[0, {"x": [{"k": 1, "k": 1}]}]', "/1/x/0/k"),
        ('{"a": 1, "b": "x\\u003ay", "a": 2}', "/a"),  # escaped colon: exact path taken
        ('{"a": 1, "\\u0061": 2}', "/a"),  # same key, spelled differently
        ('{"a/b~": 1, "a/b~": 2}', "/a~1b~0"),
    ],
)
def test_rejects_duplicate_keys_with_path(text: str, path: str) -> None:
    err = refusal(text)
    assert (err.reason, err.path) == ("duplicate_key", path)


def test_duplicate_key_message() -> None:
    err = refusal('{"a": {"b": 1, "b": 2}}')
    assert err.message == "duplicate object key 'b'"
    assert str(err) == "duplicate object key 'b' (at /a/b)"


def test_first_duplicate_in_document_order_is_reported() -> None:
    assert refusal('{"z": {"q": 1, "q": 2}, "a": 1, "a": 2}').path == "/z/q"
    assert refusal('{"a": 1, "a": {"q": 1, "q": 2}}').path == "/a"


def test_duplicate_long_key_is_truncated_in_path_and_message() -> None:
    key = "k" * 100
    err = refusal(f'{{"{key}": 1, "{key}": 2}}')
    assert err.path == "/" + "k" * 64 + "…"
    assert err.message == f"duplicate object key {'k' * 64 + '…'!r}"


def test_duplicate_after_passing_shape_walk_is_still_found() -> None:
    # Five brackets exceed max_depth=3, forcing the walk; it passes (depth 3), then the duplicate.
    err = refusal('{"l": [[1], [2], [3]], "a": 1, "a": 2}', max_depth=3)
    assert (err.reason, err.path) == ("duplicate_key", "/a")


def test_duplicate_check_beyond_stdlib_recursion_is_too_deep() -> None:
    # Depth allowed by the caller but beyond what the stdlib re-parse can recurse into.
    text = "[" * 1010 + '{"a": "\\u003a"}' + "]" * 1010
    err = refusal(text, max_depth=2000)
    assert err.reason == "too_deep"


# --- too_deep ---------------------------------------------------------------------------------


def test_depth_exactly_at_limit_is_accepted() -> None:
    assert loads_strict(nested(32)) is not None
    assert loads_strict(nested(5), max_depth=5) is not None
    assert loads_strict('{"a": {"b": {}}}', max_depth=3) == {"a": {"b": {}}}


def test_depth_over_limit_is_rejected_with_path() -> None:
    err = refusal(nested(33))
    assert (err.reason, err.path) == ("too_deep", "/0" * 32)
    assert err.message == "nesting deeper than 32 levels"
    err = refusal('{"a": [{"b": {"c": 1}}]}', max_depth=3)
    assert (err.reason, err.path) == ("too_deep", "/a/0/b")


def test_zero_depth_allows_only_scalars() -> None:
    assert loads_strict('"s"', max_depth=0) == "s"
    assert refusal("[]", max_depth=0).path == ""


def test_beyond_orjson_depth_limit_is_too_deep() -> None:
    err = refusal(nested(2000), max_depth=5000)
    assert (err.reason, str(err)) == ("too_deep", "nesting exceeds the parser limit")


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    assert loads_strict('{"s": "' + "[{" * 50 + '"}', max_depth=1) == {"s": "[{" * 50}


# --- string_too_long --------------------------------------------------------------------------


def test_string_exactly_at_limit_is_accepted() -> None:
    assert loads_strict('{"a": "' + "x" * 10 + '"}', max_string=10) == {"a": "x" * 10}
    assert loads_strict('{"' + "k" * 10 + '": 1}', max_string=10) == {"k" * 10: 1}


def test_first_long_string_in_document_order_is_reported() -> None:
    text = '{"a": "' + "v" * 11 + '", "' + "k" * 11 + '": 1}'
    assert refusal(text, max_string=10).path == "/a"


def test_string_value_over_limit_is_rejected_with_path() -> None:
    err = refusal('{"a": [1, "' + "x" * 11 + '"]}', max_string=10)
    assert (err.reason, err.path) == ("string_too_long", "/a/1")
    assert str(err) == "string longer than 10 characters (at /a/1)"


def test_top_level_string_over_limit() -> None:
    err = refusal('"' + "x" * 11 + '"', max_string=10)
    assert (err.reason, err.path) == ("string_too_long", "")


def test_key_over_limit_is_rejected_with_path() -> None:
    err = refusal('{"o": {"' + "k" * 11 + '": 1}}', max_string=10)
    assert (err.reason, err.path) == ("string_too_long", "/o/" + "k" * 11)
    assert err.message == "object key longer than 10 characters"


def test_string_limit_counts_code_points_not_escapes() -> None:
    # 10 code points written as 60 bytes of escapes fits a 10-character limit.
    assert loads_strict('"' + "\\u00e9" * 10 + '"', max_string=10) == "é" * 10
    assert refusal('"' + "\\u00e9" * 11 + '"', max_string=10).reason == "string_too_long"


def test_default_string_limit() -> None:
    assert loads_strict('"' + "x" * 65536 + '"') == "x" * 65536
    assert refusal('"' + "x" * 65537 + '"').reason == "string_too_long"


# --- too_large --------------------------------------------------------------------------------


def test_input_exactly_at_byte_limit_is_accepted() -> None:
    assert loads_strict('"abcd"', max_bytes=6) == "abcd"
    assert loads_strict(b'"abcd"', max_bytes=6) == "abcd"


@pytest.mark.parametrize("text", ['"abcde"', b'"abcde"', '"ééé"'])  # the last is 5 chars, 8 bytes
def test_input_over_byte_limit_is_rejected(text: str | bytes) -> None:
    err = refusal(text, max_bytes=6)
    assert (err.reason, err.path, str(err)) == ("too_large", "", "input exceeds 6 bytes")


def test_too_large_is_checked_before_parsing() -> None:
    assert refusal("{" * 100, max_bytes=10).reason == "too_large"
