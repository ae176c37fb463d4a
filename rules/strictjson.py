"""Strict JSON parsing for untrusted tool arguments and request bodies.

``loads_strict`` accepts exactly RFC 8259 JSON and additionally refuses what a
lenient parser would let through and a policy could then misread: duplicate
object keys (``{"amount":1,"amount":500}``: which one did the policy see?),
``NaN``/``Infinity`` and numbers that overflow to infinity, lone surrogates,
excessive nesting, oversized strings and oversized input. Every refusal is a
:class:`StrictJSONError` carrying a stable ``reason`` and the JSON-pointer-ish
``path`` where it was found.

Speed matters because every tool call goes through here: the common case is
one ``orjson.loads`` plus a few ``bytes.count`` calls and one ``orjson.dumps``
(about 2-3 µs for a 200-byte argument, see ``bench/bench_schema.py``). Only
when those cheap bounds cannot rule a problem out do we walk the value or
re-parse with the standard library to find the exact reason and path.

Canonical forms (``canonical_json``, and :func:`rules.canonical.call_key` for comparing calls) live in
:mod:`rules.canonical`; ``canonical_json`` is re-exported here.

Integers outside the 64-bit range are returned as floats (orjson's behaviour);
their magnitude, and so any limit comparison, is kept.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import orjson

from rules.canonical import canonical_json

__all__ = ["REASONS", "StrictJSONError", "canonical_json", "loads_strict"]

REASONS = frozenset(
    {"invalid_json", "duplicate_key", "non_finite_number", "too_deep", "string_too_long", "too_large"}
)
_SEGMENT_MAX = 64  # longest path segment kept; keys are instance data and may be huge
_PATH_SEARCH_MAX = 1 << 20  # above this size a too-deep document is refused without locating the spot


class StrictJSONError(ValueError):
    """Input refused by :func:`loads_strict`.

    ``reason`` is one of ``invalid_json``, ``duplicate_key``, ``non_finite_number``,
    ``too_deep``, ``string_too_long``, ``too_large``; ``path`` is a JSON pointer to
    the offending location (``""`` for the root or when the location is unknown).
    """

    def __init__(self, reason: str, message: str, path: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return f"{self.message} (at {self.path})" if self.path else self.message


def loads_strict(
    text: str | bytes,
    *,
    max_depth: int = 32,
    max_string: int = 65536,
    max_bytes: int = 1_048_576,
) -> Any:
    """Parse ``text`` as strict JSON, or raise :class:`StrictJSONError`.

    ``max_depth`` counts nested containers (a top-level scalar has depth 0, ``[]``
    depth 1); ``max_string`` is in code points and applies to keys and values;
    ``max_bytes`` is the UTF-8 size of the input. Any top-level JSON value is allowed.
    """
    if isinstance(text, str):
        if len(text) > max_bytes:  # each code point is at least one UTF-8 byte
            raise StrictJSONError("too_large", f"input exceeds {max_bytes} bytes")
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError:
            raise StrictJSONError("invalid_json", "invalid JSON: lone surrogate in input") from None
    else:
        raw = text
    if len(raw) > max_bytes:
        raise StrictJSONError("too_large", f"input exceeds {max_bytes} bytes")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _classify_decode_error(raw, exc) from None

    # Cheap upper bounds first: a document has at most as many nesting levels as
    # brackets, and no decoded string is longer than the raw text. The depth walk visits
    # containers only, so long histories (few containers, long strings) stay cheap.
    deep = raw.count(b"{") + raw.count(b"[") > max_depth and _too_deep(value, max_depth)
    if deep and len(raw) > _PATH_SEARCH_MAX:
        raise StrictJSONError("too_deep", f"nesting deeper than {max_depth} levels")
    if deep or len(raw) > max_string:
        _check_shape(value, max_depth, max_string)
    if not _surely_no_duplicates(raw, value):
        _check_duplicates(raw)
    return value


class _NonFinite(Exception):
    """Raised from the stdlib parser hooks on a non-finite number."""


def _reject_constant(token: str) -> Any:
    raise _NonFinite(token)


def _finite(token: str) -> float:
    # float() of a numeric string never raises on overflow: it returns inf.
    number = float(token)
    if math.isinf(number):
        raise _NonFinite(token)
    return number


def _classify_decode_error(raw: bytes, exc: orjson.JSONDecodeError) -> StrictJSONError:
    """Turn an orjson failure into a reasoned error.

    orjson's messages are not a stable interface, so non-finite numbers are found
    by re-parsing with the standard library, whose hooks see each number token.
    """
    if "depth" in exc.msg:  # orjson's own nesting limit (1024), deeper than any sane max_depth
        return StrictJSONError("too_deep", "nesting exceeds the parser limit")
    try:
        json.loads(
            raw,
            parse_constant=_reject_constant,
            parse_float=_finite,
            parse_int=_finite,
        )
    except _NonFinite:
        return StrictJSONError(
            "non_finite_number",
            f"non-finite number (NaN, Infinity or out of range) near line {exc.lineno} column {exc.colno}",
        )
    except (ValueError, RecursionError):
        pass
    return StrictJSONError("invalid_json", f"invalid JSON: {exc}")


def _surely_no_duplicates(raw: bytes, value: Any) -> bool:
    """True only if ``raw`` certainly has no duplicate keys (False means "check").

    Outside strings, a colon in valid JSON separates a key from its value, so the
    raw colon count is P pairs + C colons inside strings. Re-serializing the parsed
    value gives K kept keys + C' colons inside kept strings. K <= P, and without a
    ``\\u003a`` escape C' <= C, so equal counts prove P == K: nothing was dropped.
    """
    colons = raw.count(b":")
    if not colons:
        return True
    # An escaped colon could offset a dropped pair: rare, so be exact then. The
    # one-byte search is a cheap memchr that usually spares the substring search.
    if b"\\" in raw and b"\\u003" in raw:
        return False
    return orjson.dumps(value).count(b":") == colons


def _too_deep(value: Any, max_depth: int) -> bool:
    """Whether ``value`` nests containers deeper than ``max_depth`` (iterative; strings are not visited)."""
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        node, depth = pop()
        if depth > max_depth:
            return True
        for child in node.values() if type(node) is dict else node:
            kind = type(child)
            if kind is dict or kind is list:
                push((child, depth + 1))
    return False


def _short(text: str) -> str:
    return text if len(text) <= _SEGMENT_MAX else text[:_SEGMENT_MAX] + "…"


def _segment(key: str) -> str:
    return _short(key).replace("~", "~0").replace("/", "~1")


# Both walks keep a stack of child iterators rather than recursing, so nesting up to
# orjson's limit cannot hit Python's recursion limit, and they report the first
# problem in document order.
_Members = Iterator[tuple[str, Any]]


def _shape_members(node: dict[str, Any] | list[Any], path: str, max_string: int) -> _Members:
    if isinstance(node, list):
        for index, child in enumerate(node):
            yield f"{path}/{index}", child
        return
    for key, child in node.items():
        child_path = f"{path}/{_segment(key)}"
        if len(key) > max_string:
            message = f"object key longer than {max_string} characters"
            raise StrictJSONError("string_too_long", message, child_path)
        yield child_path, child


def _check_shape(value: Any, max_depth: int, max_string: int) -> None:
    """Walk ``value`` and raise on excess nesting or string length."""
    stack: list[tuple[_Members, int]] = [(iter([("", value)]), 0)]
    while stack:
        members, depth = stack[-1]
        item = next(members, None)
        if item is None:
            stack.pop()
            continue
        path, node = item
        if isinstance(node, str):
            if len(node) > max_string:
                raise StrictJSONError("string_too_long", f"string longer than {max_string} characters", path)
        elif isinstance(node, dict | list):
            if depth + 1 > max_depth:
                raise StrictJSONError("too_deep", f"nesting deeper than {max_depth} levels", path)
            stack.append((_shape_members(node, path, max_string), depth + 1))


class _Pairs(list[tuple[str, Any]]):
    """An object as parsed by the stdlib, every member kept, duplicates included."""


def _pair_members(node: list[Any], path: str) -> _Members:
    if not isinstance(node, _Pairs):
        for index, child in enumerate(node):
            yield f"{path}/{index}", child
        return
    seen: set[str] = set()
    for key, child in node:
        child_path = f"{path}/{_segment(key)}"
        if key in seen:
            raise StrictJSONError("duplicate_key", f"duplicate object key {_short(key)!r}", child_path)
        seen.add(key)
        yield child_path, child


def _check_duplicates(raw: bytes) -> None:
    """Re-parse keeping every member and raise on the first duplicate key."""
    try:
        # Numbers stay strings: only the keys matter here.
        tree = json.loads(raw, object_pairs_hook=_Pairs, parse_int=str, parse_float=str)
    except RecursionError:
        # orjson accepted the nesting but the stdlib recursion limit did not.
        raise StrictJSONError("too_deep", "nesting exceeds the parser limit") from None
    stack: list[_Members] = [iter([("", tree)])]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif isinstance(item[1], list):  # arrays and _Pairs objects
            stack.append(_pair_members(item[1], item[0]))
