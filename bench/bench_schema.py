"""Micro-benchmark: strict JSON parsing and JSON-schema validation, in µs per call.

Run: ``python bench/bench_schema.py``. Compares jsonschema_rs (what
``rules.schemas`` uses) with fastjsonschema on a typical tool schema and a
TicketAction schema, valid and invalid instances. Not a test: no assertions
on timing, only printed figures (best of several repeats).
"""

from __future__ import annotations

import json
import timeit
from collections.abc import Callable
from functools import partial
from typing import Any

import fastjsonschema
import orjson

from rules.schemas import SchemaCache, compile_schema
from rules.strictjson import loads_strict

TOOL_ARGS = (
    b'{"to":"alice@example.com","subject":"Quarterly report","body":"Hi Alice, the Q3 numbers are'
    b' attached. Total: 12,400 USD.","cc":["bob@example.com"],"amount_micros":1500000,'
    b'"send_at":"2025-01-01T10:00:00Z"}'
)
TOOL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "to": {"type": "string", "maxLength": 254},
        "subject": {"type": "string", "maxLength": 200},
        "body": {"type": "string"},
        "cc": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
        "amount_micros": {"type": "integer", "minimum": 0, "maximum": 10_000_000_000},
        "send_at": {"type": "string"},
    },
    "required": ["to", "subject", "body"],
    "additionalProperties": False,
}
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
TICKET_OK = {"action": "resolve", "reason": "refunded", "confidence": 0.93, "requires_human_review": False}
TICKET_BAD = {"action": "delete", "reason": "x", "confidence": 1.5, "requires_human_review": False}


def per_call_us(func: Callable[[], object], number: int = 20_000, repeat: int = 5) -> float:
    return min(timeit.repeat(func, number=number, repeat=repeat)) / number * 1e6


def fast_first_error(validate: Callable[[Any], Any], instance: Any) -> Callable[[], object]:
    def run() -> object:
        try:
            return validate(instance)
        except fastjsonschema.JsonSchemaValueException as exc:
            return exc

    return run


def unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def row(name: str, micros: float) -> None:
    print(f"  {name:<52} {micros:8.2f} µs")


def main() -> None:
    tool_args = orjson.loads(TOOL_ARGS)
    text = TOOL_ARGS.decode()
    print(f"strict JSON ({len(TOOL_ARGS)}-byte tool argument)")
    row("orjson.loads (baseline, no strict checks)", per_call_us(lambda: orjson.loads(TOOL_ARGS)))
    row("json.loads + duplicate-key hook (alternative)", per_call_us(
        lambda: json.loads(text, object_pairs_hook=unique_pairs)))
    row("loads_strict(bytes)", per_call_us(lambda: loads_strict(TOOL_ARGS)))
    row("loads_strict(str)", per_call_us(lambda: loads_strict(text)))
    escaped = TOOL_ARGS.replace(b"Total:", b"Total\\u003a")  # forces the exact duplicate check
    row("loads_strict, escaped colon (slow path)", per_call_us(lambda: loads_strict(escaped)))

    cases = [
        ("tool schema, valid", TOOL_SCHEMA, tool_args),
        ("TicketAction, valid", TICKET_ACTION, TICKET_OK),
        ("TicketAction, invalid", TICKET_ACTION, TICKET_BAD),
    ]
    print("\nJSON-schema validation")
    for label, schema, instance in cases:
        compiled = compile_schema(schema)
        fast = fastjsonschema.compile(schema)
        print(f" {label}")
        row("jsonschema_rs is_valid", per_call_us(partial(compiled.is_valid, instance)))
        row("jsonschema_rs violations (all, masked)", per_call_us(partial(compiled.violations, instance)))
        row("fastjsonschema validate (first error only)", per_call_us(fast_first_error(fast, instance)))

    print("\ncompile / cache")
    cache = SchemaCache()
    cache.get(TOOL_SCHEMA)
    row("SchemaCache.get, hit (canonical JSON + sha256)", per_call_us(lambda: cache.get(TOOL_SCHEMA)))
    row("compile_schema (jsonschema_rs)", per_call_us(lambda: compile_schema(TOOL_SCHEMA), number=500))
    row("fastjsonschema.compile", per_call_us(lambda: fastjsonschema.compile(TOOL_SCHEMA), number=50))


if __name__ == "__main__":
    main()
