"""JSON-schema layer: violations with exact paths and messages, bad schemas, the LRU cache."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import jsonschema_rs
import pytest

from rules.schemas import (
    CompiledSchema,
    SchemaCache,
    SchemaDefinitionError,
    SchemaLimits,
    SchemaTooComplex,
    SchemaViolation,
    compile_schema,
)

TICKET_ACTION: dict[str, Any] = {
    "type": "object",
    "required": ["action", "reason", "confidence", "requires_human_review"],
    "properties": {
        "action": {"enum": ["escalate", "resolve", "request_info", "apply_credit"]},
        "reason": {"type": "string"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "requires_human_review": {"type": "boolean"},
    },
    "additionalProperties": False,
}

SEND_EMAIL: dict[str, Any] = {
    "type": "object",
    "properties": {
        "to": {"type": "string", "format": "email"},
        "cc": {"type": "array", "items": {"type": "string", "format": "email"}, "maxItems": 3},
        "subject": {"type": "string", "maxLength": 20},
        "amount_micros": {"type": "integer", "minimum": 0},
        "a/b~c": {"type": "boolean"},
    },
    "required": ["to", "subject"],
}

VALID_ACTION = {"action": "resolve", "reason": "refund", "confidence": 0.93, "requires_human_review": False}
ANY_OF = "is not valid under any of the schemas listed in the 'anyOf' keyword"
REGEX_HINT = (" (patterns use a linear-time engine: no backreferences or look-around, and a compiled size"
              " of at most 256 KiB per pattern, less when a schema has more than 4)")


def V(path: str, message: str) -> SchemaViolation:  # noqa: N802 - reads like a constructor
    return SchemaViolation(path, message)


@pytest.fixture(scope="module")
def ticket() -> CompiledSchema:
    return compile_schema(TICKET_ACTION)


# --- valid instances --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "instance",
    [
        VALID_ACTION,
        {**VALID_ACTION, "confidence": 0},
        {**VALID_ACTION, "confidence": 1},
        {**VALID_ACTION, "action": "apply_credit", "reason": "", "requires_human_review": True},
    ],
)
def test_valid_ticket_actions_have_no_violations(ticket: CompiledSchema, instance: dict[str, Any]) -> None:
    assert ticket.violations(instance) == []
    assert ticket.is_valid(instance)


def test_valid_tool_arguments() -> None:
    schema = compile_schema(SEND_EMAIL)
    args = {"to": "a@b.io", "cc": ["c@d.io"], "subject": "Hi", "amount_micros": 1_500_000, "a/b~c": True}
    assert schema.violations(args) == []
    # 2.0 is an integer in JSON Schema.
    assert schema.violations({"to": "a@b.io", "subject": "Hi", "amount_micros": 2.0}) == []


# --- invalid instances: exact paths and messages ----------------------------------------------


@pytest.mark.parametrize(
    ("instance", "expected"),
    [
        (
            {**VALID_ACTION, "action": "delete_account"},
            [V("/action", 'value is not one of "escalate", "resolve" or 2 other candidates')],
        ),
        ({**VALID_ACTION, "confidence": 1.5}, [V("/confidence", "value is greater than the maximum of 1")]),
        ({**VALID_ACTION, "confidence": -0.1}, [V("/confidence", "value is less than the minimum of 0")]),
        ({**VALID_ACTION, "confidence": "high"}, [V("/confidence", 'value is not of type "number"')]),
        (
            {**VALID_ACTION, "requires_human_review": 0},
            [V("/requires_human_review", 'value is not of type "boolean"')],
        ),
        ({**VALID_ACTION, "reason": None}, [V("/reason", 'value is not of type "string"')]),
        (
            {**VALID_ACTION, "refund": 500},
            [V("", "Additional properties are not allowed ('refund' was unexpected)")],
        ),
        (
            {"action": "resolve", "reason": "r", "confidence": 0.5},
            [V("", '"requires_human_review" is a required property')],
        ),
        ([VALID_ACTION], [V("", 'value is not of type "object"')]),
        (None, [V("", 'value is not of type "object"')]),
    ],
)
def test_invalid_ticket_actions(
    ticket: CompiledSchema, instance: Any, expected: list[SchemaViolation]
) -> None:
    assert ticket.violations(instance) == expected
    assert not ticket.is_valid(instance)


def test_all_violations_are_reported_up_to_the_limit(ticket: CompiledSchema) -> None:
    instance = {"action": "x", "reason": 1, "confidence": 2, "requires_human_review": "no", "extra": 1}
    everything = ticket.violations(instance)
    paths = sorted(v.path for v in everything)
    assert paths == ["", "/action", "/confidence", "/reason", "/requires_human_review"]
    assert ticket.violations(instance, limit=2) == everything[:2]
    assert len(ticket.violations(instance, limit=1)) == 1


def test_limit_must_be_positive(ticket: CompiledSchema) -> None:
    # limit=0 returning [] would read as "valid".
    with pytest.raises(ValueError, match="limit must be at least 1"):
        ticket.violations({}, limit=0)


def test_nested_paths_are_json_pointers_with_escaping() -> None:
    schema = compile_schema(SEND_EMAIL)
    instance = {"to": "not-an-email", "cc": ["ok@x.io", 7, "bad"], "subject": "s", "a/b~c": "yes"}
    assert schema.violations(instance) == [
        V("/to", 'value is not a "email"'),
        V("/cc/1", 'value is not of type "string"'),
        V("/cc/2", 'value is not a "email"'),
        V("/a~1b~0c", 'value is not of type "boolean"'),
    ]


def test_messages_never_contain_instance_values() -> None:
    schema = compile_schema(SEND_EMAIL)
    secret = "sk-live-" + "s" * 5000
    found = schema.violations({"to": secret, "subject": secret, "cc": [secret] * 5, "amount_micros": -1})
    assert found == [  # in the instance's key order
        V("/to", 'value is not a "email"'),
        V("/subject", "value is longer than 20 characters"),
        V("/cc", "value has more than 3 items"),
        V("/cc/0", 'value is not a "email"'),
        V("/cc/1", 'value is not a "email"'),
        V("/cc/2", 'value is not a "email"'),
        V("/cc/3", 'value is not a "email"'),
        V("/cc/4", 'value is not a "email"'),
        V("/amount_micros", "value is less than the minimum of 0"),
    ]
    assert all("sk-live" not in v.message for v in found)


def test_long_messages_are_shortened(ticket: CompiledSchema) -> None:
    # Unexpected property names are echoed by the library; a huge one must not be.
    [violation] = ticket.violations({**VALID_ACTION, "k" * 1000: 1})
    assert len(violation.message) == 200
    assert violation.message.startswith("Additional properties are not allowed ('kkk")
    assert violation.message.endswith("k…")


def test_formats_can_be_annotations_only() -> None:
    assert compile_schema(SEND_EMAIL, validate_formats=False).violations({"to": "nope", "subject": "s"}) == []


def test_mapping_schemas_are_accepted() -> None:
    properties = MappingProxyType({"a": {"type": "string"}})
    schema = compile_schema(MappingProxyType({"type": "object", "properties": properties}))
    assert schema.violations({"a": 1}) == [V("/a", 'value is not of type "string"')]


# --- invalid schema definitions ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "nope"}, f'invalid JSON schema at /type: "nope" {ANY_OF}'),
        ({"minimum": "x"}, 'invalid JSON schema at /minimum: "x" is not of type "number"'),
        ({"required": "a"}, 'invalid JSON schema at /required: "a" is not of type "array"'),
        ({"properties": {"a": {"type": 5}}}, f"invalid JSON schema at /properties/a/type: 5 {ANY_OF}"),
        ({"type": "string", "pattern": "("}, f'invalid JSON schema at /pattern: "(" is not a "regex"{REGEX_HINT}'),
        ({"$ref": "#/$defs/missing"}, "invalid JSON schema at /: Pointer '/$defs/missing' does not exist"),
        (
            {"$schema": "http://json-schema.org/draft-07/schema#", "type": "nope"},
            f'invalid JSON schema at /type: "nope" {ANY_OF}',
        ),
        (
            # An unknown meta-schema is refused, not fetched.
            {"$schema": "https://example.com/my-meta"},
            "invalid JSON schema at /: Unknown meta-schema: 'https://example.com/my-meta'. "
            "Custom meta-schemas must be registered in the registry before use",
        ),
    ],
)
def test_invalid_schemas_are_rejected(schema: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaDefinitionError) as info:
        compile_schema(schema)
    assert str(info.value) == message


@pytest.mark.parametrize("ref", ["http://127.0.0.1:9/schema.json", "file:///etc/passwd", "urn:example:x"])
def test_remote_refs_are_never_fetched(ref: str) -> None:
    with pytest.raises(SchemaDefinitionError, match="Retrieval is disabled"):
        compile_schema({"$ref": ref})


def test_non_json_schema_is_rejected() -> None:
    with pytest.raises(SchemaDefinitionError, match="schema is not JSON: .*set"):
        compile_schema({"enum": {1, 2}})


def test_schema_definition_error_is_a_value_error() -> None:
    assert issubclass(SchemaDefinitionError, ValueError)


def test_long_schema_errors_are_shortened() -> None:
    with pytest.raises(SchemaDefinitionError) as info:
        compile_schema({"minimum": "x" * 1000})
    assert str(info.value).endswith("x…")
    assert len(str(info.value)) < 250


# --- hashing and the cache --------------------------------------------------------------------


def test_schema_hash_ignores_key_order() -> None:
    reordered = {
        "additionalProperties": False,
        "properties": dict(reversed(list(TICKET_ACTION["properties"].items()))),
        "required": TICKET_ACTION["required"],
        "type": "object",
    }
    assert compile_schema(TICKET_ACTION).schema_hash == compile_schema(reordered).schema_hash
    assert compile_schema(TICKET_ACTION).schema_hash != compile_schema({"type": "object"}).schema_hash
    assert len(compile_schema(TICKET_ACTION).schema_hash) == 64


def test_cache_returns_the_same_object_for_equal_schemas() -> None:
    cache = SchemaCache()
    first = cache.get({"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}}})
    again = cache.get({"properties": {"a": {"maxLength": 3, "type": "string"}}, "type": "object"})
    assert again is first
    assert (len(cache), cache.hits, cache.misses) == (1, 1, 1)
    assert cache.get({"type": "object"}) is not first


def test_cache_evicts_least_recently_used() -> None:
    cache = SchemaCache(maxsize=2)
    a = cache.get({"const": "a"})
    b = cache.get({"const": "b"})
    assert cache.get({"const": "a"}) is a  # a is now the most recent
    cache.get({"const": "c"})  # evicts b
    assert len(cache) == 2
    assert cache.get({"const": "a"}) is a
    assert cache.get({"const": "b"}) is not b  # recompiled
    assert (cache.hits, cache.misses) == (2, 4)


def test_cache_remembers_invalid_schemas() -> None:
    cache = SchemaCache()
    messages = set()
    for _ in range(3):
        with pytest.raises(SchemaDefinitionError) as info:
            cache.get({"type": "nope"})
        messages.add(str(info.value))
    assert messages == {f'invalid JSON schema at /type: "nope" {ANY_OF}'}  # the unmasked message, every time
    assert (len(cache), cache.misses, cache.hits) == (1, 1, 2)


def test_cache_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="maxsize must be at least 1"):
        SchemaCache(maxsize=0)


def test_cache_format_setting_applies_to_its_schemas() -> None:
    lenient = SchemaCache(validate_formats=False).get(SEND_EMAIL)
    strict = SchemaCache().get(SEND_EMAIL)
    assert lenient.violations({"to": "nope", "subject": "s"}) == []
    assert strict.violations({"to": "nope", "subject": "s"}) == [V("/to", 'value is not a "email"')]


def test_cache_keeps_one_object_when_threads_race() -> None:
    cache = SchemaCache()
    results: list[CompiledSchema] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        results.append(cache.get(TICKET_ACTION))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cache) == 1
    assert len(results) == 8
    assert all(r is results[0] for r in results)  # a losing compile is discarded, not returned


# --- bounded cost: linear-time patterns, caps before compiling, negative cache, bounded reports ---------


LIMITS = SchemaLimits(max_bytes=65536, max_depth=32)


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every schema jsonschema_rs is asked to compile (a spy on the library; our code runs unchanged)."""
    seen: list[str] = []
    real: Callable[..., Any] = jsonschema_rs.validator_for

    def spy(schema: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(schema if isinstance(schema, str) else repr(schema))
        return real(schema, *args, **kwargs)

    monkeypatch.setattr(jsonschema_rs, "validator_for", spy)
    return seen


def test_backreferences_are_refused_by_the_linear_time_engine() -> None:
    # The backtracking engine accepted this and then took seconds on a crafted argument.
    with pytest.raises(SchemaDefinitionError) as info:
        compile_schema({"type": "string", "pattern": r"^(\w+\s?)+\1$"})
    assert str(info.value) == r'invalid JSON schema at /pattern: "^(\\w+\\s?)+\\1$" is not a "regex"' + REGEX_HINT


@pytest.mark.parametrize("pattern", [r"^(?=a)b", r"(?<!x)y", r"(?<n>a)\k<n>"])
def test_look_around_is_refused(pattern: str) -> None:
    with pytest.raises(SchemaDefinitionError, match="no backreferences or look-around"):
        compile_schema({"type": "string", "pattern": pattern})


def test_one_pattern_compile_is_bounded() -> None:
    # \p{L}{200} compiled for ~100 ms before; the engine's size limit now stops it early.
    with pytest.raises(SchemaDefinitionError, match="compiled size"):
        compile_schema({"type": "string", "pattern": r"\p{L}{200}"})
    with pytest.raises(SchemaDefinitionError, match="compiled size"):
        compile_schema({"patternProperties": {r"\p{L}{200}x": {}}})
    assert compile_schema({"type": "string", "pattern": r"^\p{L}{5}$"}).is_valid("Zoëab")


def test_pattern_budget_is_shared_by_the_patterns_of_a_schema() -> None:
    # Up to four patterns may compile to 256 KiB each; six share 1 MiB (~170 KiB each), too little for
    # this one (~210 KiB). (An anchored class repetition like ^\p{L}{5}$ needs no regex at all.)
    heavy = r"^\p{L}{5}x$"
    compile_schema({"properties": {f"p{i}": {"pattern": heavy} for i in range(4)}}, limits=LIMITS)
    with pytest.raises(SchemaDefinitionError, match="compiled size"):
        compile_schema({"properties": {f"p{i}": {"pattern": heavy} for i in range(6)}}, limits=LIMITS)


def _nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"items": schema}  # one nesting level each
    return schema


def _laughs(levels: int, fanout: int = 10) -> dict[str, Any]:
    defs: dict[str, Any] = {"l0": {"type": "string"}}
    for k in range(1, levels + 1):
        defs[f"l{k}"] = {"allOf": [{"$ref": f"#/$defs/l{k - 1}"}] * fanout}
    return {"$defs": defs, "$ref": f"#/$defs/l{levels}"}


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"enum": ["x" * 70_000]}, "the schema is 70013 bytes; at most 65536 are allowed"),
        (_nested(32), "the schema nests more than 32 levels deep"),
        (
            {"properties": {f"p{i}": {"pattern": f"^{i}$"} for i in range(65)}},
            "the schema has 65 regular expressions (pattern, patternProperties); at most 64 are allowed",
        ),
        (
            {"patternProperties": {f"^{i}$": {} for i in range(40)}, "propertyNames": {"pattern": "^a"},
             "properties": {f"p{i}": {"pattern": "^b"} for i in range(24)}},
            "the schema has 65 regular expressions (pattern, patternProperties); at most 64 are allowed",
        ),
        (_laughs(4), "the schema expands to 93815 values through $ref; at most 65536 are allowed"),
        ({"$ref": "#foo", "$defs": {"a": {"$anchor": "foo"}}},
         "only local references ('#' or '#/...') are allowed, not '#foo'"),
        ({"$ref": "other.json"}, "only local references ('#' or '#/...') are allowed, not 'other.json'"),
        ({"$dynamicRef": "#/$defs/a", "$defs": {"a": {}}},
         "only local references ('#' or '#/...') are allowed, not $dynamicRef"),
        ({"$defs": {"a": {"$id": "https://example.com/a", "type": "string"}}, "$ref": "#/$defs/a"},
         "embedded resources ($id below the root) are not allowed with $ref"),
    ],
)
def test_caps_refuse_before_compiling(compiles: list[str], schema: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaTooComplex) as info:
        compile_schema(schema, limits=LIMITS)
    assert str(info.value) == message
    assert compiles == []  # refused without asking the library to compile anything


def test_caps_allow_what_is_at_the_limit() -> None:
    compile_schema(_nested(31), limits=LIMITS)  # 32 levels
    compile_schema({"properties": {f"p{i}": {"pattern": f"^{i}$"} for i in range(64)}}, limits=LIMITS)
    compile_schema(_laughs(3), limits=LIMITS)  # 9,000 values once expanded
    size = len(b'{"enum":[""]}')
    compile_schema({"enum": ["x" * (65536 - size)]}, limits=LIMITS)
    # without limits (a policy's own schemas) there are no size caps
    compile_schema({"enum": ["x" * 70_000]})
    compile_schema(_nested(40))


def test_too_complex_is_a_schema_definition_error() -> None:
    # The compiler reports it as a located load error like any other invalid schema.
    assert issubclass(SchemaTooComplex, SchemaDefinitionError)


def test_limits_must_be_sane() -> None:
    with pytest.raises(ValueError, match="max_depth between 1 and 1023"):
        SchemaLimits(max_depth=1024)
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        SchemaLimits(max_bytes=0)


def test_oversize_is_refused_by_the_cache_before_measuring(compiles: list[str]) -> None:
    cache = SchemaCache()
    with pytest.raises(SchemaTooComplex, match="70013 bytes"):
        cache.get({"enum": ["x" * 70_000]}, limits=LIMITS)
    assert (compiles, len(cache)) == ([], 0)


def test_recursion_and_reuse_are_not_expansion() -> None:
    tree = {"$defs": {"n": {"required": ["kids"], "properties": {"kids": {"items": {"$ref": "#/$defs/n"}}}}},
            "$ref": "#/$defs/n"}
    assert compile_schema(tree, limits=LIMITS).is_valid({"kids": [{"kids": []}]})
    assert not compile_schema(tree, limits=LIMITS).is_valid({"kids": [{}]})
    assert compile_schema({"properties": {"a": {"$ref": "#"}}}, limits=LIMITS).is_valid({"a": {"a": {}}})
    escaped = {"$defs": {"a/b~c": {"type": "string"}, "d e": {"type": "integer"}},
               "properties": {"x": {"$ref": "#/$defs/a~1b~0c"}, "y": {"$ref": "#/$defs/d%20e"}}}
    assert compile_schema(escaped, limits=LIMITS).violations({"x": 1, "y": "s"}) == [
        V("/x", 'value is not of type "string"'), V("/y", 'value is not of type "integer"')]
    by_index = {"anyOf": [{"type": "object"}, {"type": "string"}], "properties": {"a": {"$ref": "#/anyOf/1"}}}
    assert compile_schema(by_index, limits=LIMITS).violations({"a": 1}) == [V("/a", 'value is not of type "string"')]
    # a pointer to nothing passes the caps and is reported by the compiler
    for missing in ("#/anyOf/2", "#/anyOf/x", "#/anyOf/1/type/x"):
        with pytest.raises(SchemaDefinitionError, match="does not exist|Failed to parse array index") as info:
            compile_schema({**by_index, "properties": {"a": {"$ref": missing}}}, limits=LIMITS)
        assert not isinstance(info.value, SchemaTooComplex)
    # a "$ref" that is data (in a const, or a property named "$ref") is not a reference
    data = {"const": {"$ref": "https://example.com"}, "properties": {"$ref": {"type": "string"}}}
    assert compile_schema(data, limits=LIMITS).is_valid({"$ref": "https://example.com"})


def test_failing_schema_is_compiled_once(compiles: list[str]) -> None:
    cache = SchemaCache()
    for _ in range(3):
        with pytest.raises(SchemaDefinitionError, match="backreferences"):
            cache.get({"type": "string", "pattern": r"(a)\1"}, limits=LIMITS)
    assert len(compiles) == 1  # before: twice per request (masked, then again for the message)
    assert (cache.compiles, cache.misses, cache.hits) == (1, 1, 2)


def test_too_complex_schema_is_remembered_without_compiling(compiles: list[str]) -> None:
    cache = SchemaCache()
    for _ in range(2):
        with pytest.raises(SchemaTooComplex, match="nests more than 32 levels"):
            cache.get(_nested(39), limits=LIMITS)
    assert compiles == []
    assert (cache.compiles, cache.misses, cache.hits) == (0, 1, 1)
    # The caps belong to the caller, the measured shape to the schema: looser limits compile it.
    assert cache.get(_nested(39), limits=SchemaLimits(max_bytes=65536, max_depth=40)).is_valid([])
    assert cache.get(_nested(39)).is_valid([])
    assert len(compiles) == 1


def test_cache_is_bounded_by_weight_too() -> None:
    # Entries weigh their schema bytes plus the regex memory they may hold: a few heavy ones fill it.
    cache = SchemaCache(maxsize=50, max_weight=1 << 20)
    for i in range(8):
        cache.get({"type": "string", "pattern": rf"^\p{{L}}{i}$"})  # up to 256 KiB of regex memory each
    assert len(cache) == 3
    for i in range(100):
        with pytest.raises(SchemaDefinitionError):
            cache.get({"type": f"nope{i}"})  # failures are entries too, and evicted like the rest
    assert len(cache) == 50


def test_cache_weight_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_weight must be at least 1"):
        SchemaCache(max_weight=0)


def test_violations_stop_at_the_first_when_the_report_could_explode() -> None:
    # Collecting every error costs one object per (failing keyword, value): 300 x 300 here. Beyond a fixed
    # work bound only the first violation is reported; the verdict is the same.
    schema = compile_schema({"type": "array", "items": {"allOf": [{"type": "string", "maxLength": i}
                                                                  for i in range(300)]}})
    assert schema.violations([1] * 300) == [V("/0", 'value is not of type "string"')]
    assert not schema.is_valid([1] * 300)
    small = compile_schema({"type": "array", "items": {"type": "string"}})
    assert len(small.violations([1] * 20)) == 10  # cheap reports stay complete up to the limit


def test_violations_of_amplifying_recursion_report_the_first_only() -> None:
    # Each level of the instance multiplies the errors by 3 (3^8 of them at depth 8 before the fix).
    schema = compile_schema({"$defs": {"a": {"allOf": [{"items": {"$ref": "#/$defs/a"}, "minItems": i}
                                                       for i in range(3)]}}, "$ref": "#/$defs/a"})
    instance: Any = 1
    for _ in range(8):
        instance = [instance]
    assert len(schema.violations(instance)) == 1
