"""JSON-schema validators, compiled once and reused.

Policy schemas are compiled when the policy set is compiled; schemas that a
request declares (``tools[].function.parameters``) go through a
:class:`SchemaCache` owned by the app, so each distinct schema compiles once.

Built on ``jsonschema_rs`` rather than ``fastjsonschema``: it was 3-4x faster
on valid instances in ``bench/bench_schema.py`` (the common case), it reports every
violation rather than the first, it can refuse all remote ``$ref`` retrieval
(request schemas are untrusted input; fastjsonschema fetches them over HTTP
and generates Python source from the schema), and it can mask instance values
in messages so arguments never leak into errors or audit lines.

Compilation checks the schema against its meta-schema (draft from ``$schema``,
2020-12 by default) and compiles regexes; ``format`` is asserted, not just
annotated, because rejecting a malformed argument is this layer's job.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema_rs

from rules.strictjson import canonical_json

__all__ = ["CompiledSchema", "SchemaCache", "SchemaDefinitionError", "SchemaViolation", "compile_schema"]

_MASK = "value"  # stands in for instance values in messages: 'value is not of type "string"'
_MESSAGE_MAX = 200  # property names and schema constants can still appear; keep messages short


class SchemaDefinitionError(ValueError):
    """The schema itself is invalid (not JSON, fails its meta-schema, bad regex or ``$ref``)."""


@dataclass(frozen=True)
class SchemaViolation:
    """One way an instance fails a schema: where (JSON pointer) and why."""

    path: str
    message: str


def _pointer(parts: list[str | int]) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def _shorten(message: str) -> str:
    return message if len(message) <= _MESSAGE_MAX else message[: _MESSAGE_MAX - 1] + "…"


class CompiledSchema:
    """A validator built once from a schema; cheap to call many times."""

    __slots__ = ("_schema_hash", "_validator")

    def __init__(self, validator: jsonschema_rs.Validator, schema_hash: str) -> None:
        self._validator = validator
        self._schema_hash = schema_hash

    @property
    def schema_hash(self) -> str:
        """SHA-256 hex of the schema's canonical JSON (same for any key order)."""
        return self._schema_hash

    def is_valid(self, instance: Any) -> bool:
        """True when ``instance`` satisfies the schema."""
        return self._validator.is_valid(instance)

    def violations(self, instance: Any, limit: int = 10) -> list[SchemaViolation]:
        """Up to ``limit`` violations of the schema by ``instance``; empty means valid.

        Violations come in the instance's key order. Messages name the failed
        constraint and replace the instance value by ``value``, so arguments never
        end up in errors or logs.
        """
        if limit < 1:
            # limit=0 would report an invalid instance as valid.
            raise ValueError("limit must be at least 1")
        if self._validator.is_valid(instance):  # fast path; building errors costs ~10x more
            return []
        found: list[SchemaViolation] = []
        for error in self._validator.iter_errors(instance):
            found.append(SchemaViolation(_pointer(error.instance_path), _shorten(error.message)))
            if len(found) == limit:
                break
        return found


def _canonical(schema: Mapping[str, Any]) -> tuple[str, bytes]:
    try:
        text = canonical_json(schema)
    except TypeError as exc:
        raise SchemaDefinitionError(f"schema is not JSON: {exc}") from None
    return hashlib.sha256(text).hexdigest(), text


def _validator(text: str, validate_formats: bool, mask: str | None) -> jsonschema_rs.Validator:
    # offline: a $ref or $schema naming a URL must never make the proxy fetch anything
    # (jsonschema_rs.meta.validate has no such switch, so it is not used).
    return jsonschema_rs.validator_for(text, validate_formats=validate_formats, mask=mask, offline=True)


def _compile(text: bytes, schema_hash: str, validate_formats: bool) -> CompiledSchema:
    source = text.decode("utf-8")
    try:
        return CompiledSchema(_validator(source, validate_formats, _MASK), schema_hash)
    except jsonschema_rs.ValidationError:  # meta-schema, regex and $ref failures all land here
        pass
    # Compile again unmasked for the report: schema values are no secret, and
    # '"nope" is not valid ...' says more than 'value is not valid ...'.
    try:
        _validator(source, validate_formats, None)
    except jsonschema_rs.ValidationError as exc:
        where = _pointer(exc.instance_path) or "/"
        raise SchemaDefinitionError(f"invalid JSON schema at {where}: {_shorten(exc.message)}") from None
    raise AssertionError("schema failed to compile only when masked")  # pragma: no cover


def compile_schema(schema: Mapping[str, Any], *, validate_formats: bool = True) -> CompiledSchema:
    """Compile ``schema``, or raise :class:`SchemaDefinitionError` if it is not a valid schema.

    The validator is built from the canonical (sorted-key) JSON of the schema, so
    equal schemas behave identically, violation order included.
    """
    schema_hash, text = _canonical(schema)
    return _compile(text, schema_hash, validate_formats)


class SchemaCache:
    """Bounded LRU of compiled schemas keyed by the SHA-256 of their canonical JSON.

    Owned by the caller (one per app). Safe to share between threads; two threads
    missing on the same schema may both compile it, and the first stored wins.
    """

    def __init__(self, maxsize: int = 1024, *, validate_formats: bool = True) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._validate_formats = validate_formats
        self._entries: OrderedDict[str, CompiledSchema] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, schema: Mapping[str, Any]) -> CompiledSchema:
        """The compiled form of ``schema``, compiling it on first sight.

        Raises :class:`SchemaDefinitionError` for an invalid schema (not cached,
        so each request carrying it is refused the same way).
        """
        schema_hash, text = _canonical(schema)
        with self._lock:
            cached = self._entries.get(schema_hash)
            if cached is not None:
                self._entries.move_to_end(schema_hash)
                self.hits += 1
                return cached
            self.misses += 1
        compiled = _compile(text, schema_hash, self._validate_formats)  # outside the lock: can be slow
        with self._lock:
            cached = self._entries.setdefault(schema_hash, compiled)
            self._entries.move_to_end(schema_hash)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return cached
