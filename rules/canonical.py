"""Canonical forms of JSON values: when two tool calls are "the same action".

Two calls are the same action when their tool names are equal and their arguments are equal *as JSON
values*: key order and insignificant whitespace never matter, strings stay strings, and numbers are
compared as numbers, exactly: ``20``, ``20.0``, ``2e1`` and ``20.00`` are one number, ``0.1`` and
``0.10000000000000001`` are two. :func:`call_key` is the one digest every comparison of calls uses
(once-per-conversation markers, approval binding, de-duplication), so re-spelling a number can never
make a repeated action look new.

Speed: arguments without any non-integer number are exact as orjson parsed them (it keeps 64-bit
integers exact), so their canonical form is one ``orjson.dumps`` with sorted keys. Only arguments with a
fraction or exponent somewhere are re-read from their text with :class:`decimal.Decimal` numbers, since a
double may have rounded them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import orjson

__all__ = ["call_key", "canonical_json", "canonical_value"]


def canonical_json(value: Any) -> bytes:
    """Serialize ``value`` as compact JSON with sorted keys (stable across key order).

    Non-dict mappings are accepted. Values are expected to come from
    :func:`rules.strictjson.loads_strict`: orjson writes non-finite floats as ``null`` and raises
    ``TypeError`` for non-JSON types, non-string keys and integers beyond 64 bits. Numbers are written as
    parsed (``20.0`` stays ``20.0``); for comparing calls use :func:`canonical_value`.
    """
    return orjson.dumps(value, default=_mapping_default, option=orjson.OPT_SORT_KEYS)


def _mapping_default(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(type(obj).__name__)  # orjson words the error itself


def _has_inexact(value: Any) -> bool:
    """Whether ``value`` holds a float (a number written with a fraction or exponent, or an integer beyond
    64 bits): only then can the parsed value differ from the number as written."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, float):
            return True
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _number(d: Decimal) -> bytes:
    # One spelling per value: integers in plain digits (so 2e1 == 20 == 20.00), other numbers in
    # Decimal's normalized scientific-or-plain form, which is unique for a value.
    if d == d.to_integral_value():
        return str(int(d)).encode()
    return str(d.normalize()).encode()


def _exact(node: Any, out: list[bytes]) -> None:
    if isinstance(node, dict):
        out.append(b"{")
        for i, key in enumerate(sorted(node)):
            if i:
                out.append(b",")
            out.append(orjson.dumps(key))
            out.append(b":")
            _exact(node[key], out)
        out.append(b"}")
    elif isinstance(node, list):
        out.append(b"[")
        for i, item in enumerate(node):
            if i:
                out.append(b",")
            _exact(item, out)
        out.append(b"]")
    elif isinstance(node, Decimal):
        out.append(_number(node))
    else:  # str, bool, None: orjson's spelling, the same as the fast path's
        out.append(orjson.dumps(node))


def canonical_value(value: Any, text: str | bytes) -> bytes:
    """The canonical bytes of a JSON value parsed from ``text`` (strictly, e.g. by ``loads_strict``).

    Equal JSON values give equal bytes and different values different bytes. ``text`` must be the
    document ``value`` was parsed from; it is read again only when ``value`` holds a non-integer number.
    Nesting is bounded by the strict parser's depth limit, so the recursion here is too.
    """
    if not _has_inexact(value):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    exact = json.loads(text, parse_float=Decimal, parse_int=Decimal)
    out: list[bytes] = []
    _exact(exact, out)
    return b"".join(out)


def call_key(tool: str, value: Any, text: str | bytes) -> str:
    """SHA-256 hex digest identifying a call of ``tool`` with the arguments ``value`` parsed from ``text``.

    Hashes the tool name, a newline, then :func:`canonical_value` of the arguments; unambiguous because
    canonical JSON never contains a raw newline.
    """
    return hashlib.sha256(tool.encode("utf-8") + b"\n" + canonical_value(value, text)).hexdigest()
