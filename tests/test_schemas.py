"""JSON-schema layer: violations with exact paths and messages, bad schemas, the LRU cache."""

from __future__ import annotations

import threading
from types import MappingProxyType
from typing import Any

import pytest

from rules.schemas import CompiledSchema, SchemaCache, SchemaDefinitionError, SchemaViolation, compile_schema

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
        ({"type": "string", "pattern": "("}, 'invalid JSON schema at /pattern: "(" is not a "regex"'),
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


def test_cache_does_not_store_invalid_schemas() -> None:
    cache = SchemaCache()
    for _ in range(2):
        with pytest.raises(SchemaDefinitionError):
            cache.get({"type": "nope"})
    assert (len(cache), cache.misses) == (0, 2)


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
