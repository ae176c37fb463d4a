"""Compile-stage checks on a policy document that failed validation.

A document with an unknown field never becomes a :class:`~rules.model.Policy`,
so the compiler never sees its CEL conditions, RE2 patterns or JSON schemas.
:func:`precheck` walks the raw data tolerantly (any shape, nothing assumed) and
compiles every one it can find where the surrounding structure allows, so one
``guardproxy check`` run reports the unknown field *and* the broken condition.
Errors are worded by the compiler's own helpers. The shell calls it; the loader,
an earlier stage, does not.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import re2

from rules.celexpr import CelCompileError, compile_condition, new_env
from rules.compiler import cel_error, re2_options, regex_error, schema_error
from rules.schemas import SchemaDefinitionError, compile_schema
from rules.yamlsrc import Located, Path, SourceError, format_path

__all__ = ["precheck"]


def _items(value: Any) -> Iterator[tuple[str | int, Any]]:
    """Children of a mapping (string keys) or a sequence; nothing for anything else."""
    if isinstance(value, dict):
        yield from ((k, v) for k, v in value.items() if isinstance(k, str))
    elif isinstance(value, list):
        yield from enumerate(value)


def _get(value: Any, key: str) -> Any:
    return value.get(key) if isinstance(value, dict) else None


def _found(data: Any) -> Iterator[tuple[str, Path, Any]]:
    """Every ``(kind, path, value)`` the compiler would compile, where the shape lets us find it."""
    tools_allow = _get(_get(data, "tools"), "allow")
    if isinstance(tools_allow, dict):
        for tool, spec in _items(tools_allow):
            base: Path = ("tools", "allow", tool)
            for i, rule in _items(_get(spec, "rules")):
                yield "cel", (*base, "rules", i, "when"), _get(rule, "when")
            yield "schema", (*base, "schema"), _get(spec, "schema")
    output = _get(data, "output")
    for i, rule in _items(_get(output, "rules")):
        yield "cel", ("output", "rules", i, "when"), _get(rule, "when")
    yield "schema", ("output", "schema"), _get(output, "schema")
    for i, pattern in _items(_get(output, "deny_patterns")):
        yield "regex", ("output", "deny_patterns", i, "regex"), _get(pattern, "regex")


def _covered(path: str, reported: set[str]) -> bool:
    """Whether an error is already reported at ``path`` or inside it."""
    return any(r == path or r.startswith((path + ".", path + "[")) for r in reported)


def precheck(located: Located, reported: Iterable[SourceError] = ()) -> list[SourceError]:
    """Compile every CEL ``when``, RE2 ``regex`` and JSON ``schema`` found in ``located``'s data.

    Only values validation would accept are compiled (a non-empty string, a mapping), and a value with
    an error in ``reported`` at or below it is skipped, so nothing is reported twice.
    """
    done = {e.path for e in reported if e.source == located.source}
    env = None
    errors: list[SourceError] = []
    for kind, path, value in _found(located.data):
        where = format_path(path)
        if _covered(where, done):
            continue
        message = None
        if kind == "schema" and isinstance(value, dict):
            try:
                compile_schema(value)
            except SchemaDefinitionError as exc:
                message = schema_error(exc)
        elif kind == "cel" and isinstance(value, str) and value:
            if env is None:
                env = new_env()
            try:
                compile_condition(env, value)
            except CelCompileError as exc:
                message = cel_error(exc)
        elif kind == "regex" and isinstance(value, str) and value:
            try:
                re2.compile(value, options=re2_options())
            except re2.error as exc:
                message = regex_error(exc)
        if message is not None:
            errors.append(SourceError(located.source, located.line_of(path), where, message))
    return errors
