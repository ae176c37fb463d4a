"""JSON-schema validators, compiled once and reused, at a bounded cost.

Policy schemas are compiled when the policy set is compiled; schemas that a
request declares (``tools[].function.parameters``) go through a
:class:`SchemaCache` owned by the app, so each distinct schema compiles once,
and a schema that fails to compile fails once: the failure is cached too.

Built on ``jsonschema_rs`` rather than ``fastjsonschema``: it was 3-4x faster
on valid instances in ``bench/bench_schema.py`` (the common case), it reports every
violation rather than the first, it can refuse all remote ``$ref`` retrieval
(request schemas are untrusted input; fastjsonschema fetches them over HTTP
and generates Python source from the schema), and it can mask instance values
in messages so arguments never leak into errors or audit lines.

Compilation checks the schema against its meta-schema (draft from ``$schema``,
2020-12 by default) and compiles regexes; ``format`` is asserted, not just
annotated, because rejecting a malformed argument is this layer's job.

Bounded cost. ``jsonschema_rs`` holds the GIL while it compiles and validates, so
a worker thread would not free the event loop: the work itself is bounded.

- ``pattern`` and ``patternProperties`` use the linear-time ``regex`` engine
  (no backreferences or look-around, so no catastrophic backtracking on a
  model's argument), and each pattern's compiled size is capped: 256 KiB for a
  lone pattern, 1 MiB shared by all the patterns of a schema. Building (or
  refusing) a pattern takes time proportional to that size.
- An untrusted schema is measured against :class:`SchemaLimits` before it is
  compiled (:class:`SchemaTooComplex`): canonical size, nesting depth, number
  of patterns, and its size once local ``$ref`` are expanded (a few bytes of
  references to references can stand for billions of subschemas to validate).
- Collecting every violation costs one object per failing (keyword, value)
  pair, and a recursive schema can multiply those by each level of the
  instance; when that could explode, only the first violation is reported.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema_rs
import orjson

from rules._schema_shape import (
    MAX_PATTERNS,
    REGEX_ALONE,
    REGEX_SCHEMA,
    SchemaLimits,
    Shape,
    measure,
    over_limits,
    too_large,
)
from rules.strictjson import canonical_json

__all__ = [
    "MAX_PATTERNS",
    "CompiledSchema",
    "SchemaCache",
    "SchemaDefinitionError",
    "SchemaLimits",
    "SchemaTooComplex",
    "SchemaViolation",
    "compile_schema",
]

_MASK = "value"  # stands in for instance values in messages: 'value is not of type "string"'
_MESSAGE_MAX = 200  # property names and schema constants can still appear; keep messages short

_REGEX_HINT = (f" (patterns use a linear-time engine: no backreferences or look-around, and a compiled size"
               f" of at most {REGEX_ALONE // 1024} KiB per pattern, less when a schema has more than"
               f" {REGEX_SCHEMA // REGEX_ALONE})")

# Reporting every violation of a value is skipped beyond this many (schema value x instance value) pairs:
# at ~7 µs an error, the worst report stays in the tens of milliseconds.
_REPORT_WORK = 8192


class SchemaDefinitionError(ValueError):
    """The schema itself is invalid (not JSON, fails its meta-schema, bad regex or ``$ref``)."""


class SchemaTooComplex(SchemaDefinitionError):
    """The schema is over a :class:`SchemaLimits` cap; it was refused without being compiled."""


@dataclass(frozen=True)
class SchemaViolation:
    """One way an instance fails a schema: where (JSON pointer) and why."""

    path: str
    message: str


def _pointer(parts: list[str | int]) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def _shorten(message: str) -> str:
    return message if len(message) <= _MESSAGE_MAX else message[: _MESSAGE_MAX - 1] + "…"


def _weight(instance: Any) -> int:
    """An upper bound on the number of JSON values in ``instance`` (a value the validator accepted)."""
    if not isinstance(instance, dict | list):
        return 1
    text = orjson.dumps(instance)  # dicts, lists and tuples: what the validator accepts
    return text.count(b",") + text.count(b":") + text.count(b"[") + 1


class CompiledSchema:
    """A validator built once from a schema; cheap to call many times."""

    __slots__ = ("_report_weight", "_schema_hash", "_validator")

    def __init__(self, validator: jsonschema_rs.Validator, schema_hash: str, report_weight: int | None = 1) -> None:
        self._validator = validator
        self._schema_hash = schema_hash
        self._report_weight = report_weight  # None: reporting every violation could explode

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
        end up in errors or logs. When collecting them all could be expensive (a
        large schema times a large instance, or a recursive schema, whose errors
        can multiply with each level of the instance), only the first is reported.
        """
        if limit < 1:
            # limit=0 would report an invalid instance as valid.
            raise ValueError("limit must be at least 1")
        if self._validator.is_valid(instance):  # fast path; building errors costs ~10x more
            return []
        weight = self._report_weight
        if weight is None or weight * _weight(instance) > _REPORT_WORK:
            # jsonschema_rs builds every error before yielding the first; validate() stops at one.
            try:
                self._validator.validate(instance)
            except jsonschema_rs.ValidationError as first:
                return [SchemaViolation(_pointer(first.instance_path), _shorten(first.message))]
            return []  # pragma: no cover - is_valid said otherwise
        found: list[SchemaViolation] = []
        for error in self._validator.iter_errors(instance):
            found.append(SchemaViolation(_pointer(error.instance_path), _shorten(error.message)))
            if len(found) == limit:
                break
        return found


# --- compiling ------------------------------------------------------------------------------------


def _canonical(schema: Mapping[str, Any]) -> tuple[str, bytes]:
    try:
        text = canonical_json(schema)
    except TypeError as exc:
        raise SchemaDefinitionError(f"schema is not JSON: {exc}") from None
    return hashlib.sha256(text).hexdigest(), text


def _validator(text: str, validate_formats: bool, regex_limit: int) -> jsonschema_rs.Validator:
    # offline: a $ref or $schema naming a URL must never make the proxy fetch anything
    # (jsonschema_rs.meta.validate has no such switch, so it is not used).
    engine = jsonschema_rs.RegexOptions(size_limit=regex_limit, dfa_size_limit=regex_limit)
    return jsonschema_rs.validator_for(text, validate_formats=validate_formats, mask=_MASK, offline=True,
                                       pattern_options=engine)


def _definition_error(exc: jsonschema_rs.ValidationError) -> SchemaDefinitionError:
    # Compiled once, masked: put the schema's own value back in the message ('"nope" is not valid ...'
    # says more than 'value is not valid ...'; schema values are no secret).
    message = exc.message
    if message.startswith(_MASK + " "):  # the instance here is a value of the schema: JSON
        message = orjson.dumps(exc.instance).decode() + message[len(_MASK):]
    hint = _REGEX_HINT if isinstance(exc.kind, jsonschema_rs.ValidationErrorKind.Format) \
        and exc.kind.format == "regex" else ""
    where = _pointer(exc.instance_path) or "/"
    return SchemaDefinitionError(f"invalid JSON schema at {where}: {_shorten(message)}{hint}")


def _build(text: bytes, schema_hash: str, validate_formats: bool, shape: Shape) -> CompiledSchema:
    try:
        validator = _validator(text.decode("utf-8"), validate_formats, shape.regex_limit())
    except jsonschema_rs.ValidationError as exc:  # meta-schema, regex and $ref failures all land here
        raise _definition_error(exc) from None
    return CompiledSchema(validator, schema_hash, shape.report_weight(text))


def compile_schema(schema: Mapping[str, Any], *, validate_formats: bool = True,
                   limits: SchemaLimits | None = None) -> CompiledSchema:
    """Compile ``schema``, or raise :class:`SchemaDefinitionError` if it is not a valid schema.

    The validator is built from the canonical (sorted-key) JSON of the schema, so
    equal schemas behave identically, violation order included. With ``limits``
    (an untrusted schema), a schema over them raises :class:`SchemaTooComplex`
    before anything is compiled.
    """
    schema_hash, text = _canonical(schema)
    if limits is not None and (reason := too_large(text, limits)) is not None:
        raise SchemaTooComplex(reason)  # before measuring: measuring may walk the schema
    shape = measure(text)
    if limits is not None and (reason := over_limits(text, shape, limits)) is not None:
        raise SchemaTooComplex(reason)
    return _build(text, schema_hash, validate_formats, shape)


# --- the cache --------------------------------------------------------------------------------------


class _Entry:
    """A schema seen before: its shape, the last caps it was checked against, its compile outcome."""

    __slots__ = ("checked", "error", "refusal", "result", "shape", "weight")

    def __init__(self, text: bytes) -> None:
        self.shape = measure(text)
        self.weight = len(text)
        self.checked: SchemaLimits | None = None
        self.refusal: str | None = None
        self.result: CompiledSchema | None = None
        self.error: str | None = None  # compiled and failed: the message, raised afresh each time


class SchemaCache:
    """Bounded LRU of compiled schemas keyed by the SHA-256 of their canonical JSON.

    Owned by the caller (one per app). Safe to share between threads; two threads
    missing on the same schema may both compile it, and the first stored wins.
    Failures are entries too (a schema that does not compile is compiled once).
    Bounded by count (``maxsize``) and by weight (``max_weight``: schema bytes,
    plus the memory its patterns may take once compiled).
    """

    def __init__(self, maxsize: int = 1024, *, validate_formats: bool = True, max_weight: int = 64 << 20) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        if max_weight < 1:
            raise ValueError("max_weight must be at least 1")
        self.maxsize = maxsize
        self.max_weight = max_weight
        self.hits = 0
        self.misses = 0
        self.compiles = 0  # schemas handed to the library (a miss refused by the caps is not compiled)
        self._validate_formats = validate_formats
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._weight = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, schema: Mapping[str, Any], limits: SchemaLimits | None = None) -> CompiledSchema:
        """The compiled form of ``schema``, compiling it on first sight.

        Raises :class:`SchemaTooComplex` when ``limits`` are given and the schema
        is over them, :class:`SchemaDefinitionError` for an invalid schema; both
        are remembered, so a schema is measured and compiled at most once.
        """
        schema_hash, text = _canonical(schema)
        if limits is not None and (reason := too_large(text, limits)) is not None:
            raise SchemaTooComplex(reason)  # before measuring: measuring may walk the schema
        with self._lock:
            entry = self._entries.get(schema_hash)
            if entry is not None:
                self._entries.move_to_end(schema_hash)
                self.hits += 1
        if entry is None:
            fresh = _Entry(text)  # measured outside the lock: can take a walk over the schema
            with self._lock:
                self.misses += 1
                entry = self._entries.setdefault(schema_hash, fresh)
                if entry is fresh:  # pragma: no branch - else another thread stored it first
                    self._add(entry.weight)
        if limits is not None and entry.checked != limits:
            entry.refusal, entry.checked = over_limits(text, entry.shape, limits), limits
        if limits is not None and entry.refusal is not None:
            raise SchemaTooComplex(entry.refusal)
        if entry.result is None and entry.error is None:
            self._compile(schema_hash, text, entry)
        if entry.error is not None:
            raise SchemaDefinitionError(entry.error)
        assert entry.result is not None
        return entry.result

    def _compile(self, schema_hash: str, text: bytes, entry: _Entry) -> None:
        result: CompiledSchema | None = None
        error: str | None = None
        try:
            result = _build(text, schema_hash, self._validate_formats, entry.shape)  # outside the lock: slow
        except SchemaDefinitionError as exc:
            error = str(exc)
        with self._lock:
            self.compiles += 1
            if entry.result is not None or entry.error is not None:  # pragma: no cover - a lost race
                return  # another thread stored its outcome first
            entry.result, entry.error = result, error
            if result is not None and self._entries.get(schema_hash) is entry:
                extra = 3 * len(text) + entry.shape.patterns * entry.shape.regex_limit()
                entry.weight += extra
                self._add(extra)

    def _add(self, weight: int) -> None:
        """Account ``weight`` more for the entry and evict least recently used ones over the bounds."""
        self._weight += weight
        while len(self._entries) > 1 and (len(self._entries) > self.maxsize or self._weight > self.max_weight):
            _, evicted = self._entries.popitem(last=False)
            self._weight -= evicted.weight
