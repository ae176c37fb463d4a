"""What the mock upstream answers: scripted reply models, the default reply, and OpenAI rendering.

A chat request plus an optional :class:`ScriptedReply` resolve into a :class:`Plan` (content, tool
calls, finish reason, usage, model); the plan renders as one ``chat.completion`` JSON document or as the
SSE events of a ``chat.completion.chunk`` stream. Ids and ``created`` are parameters so that the caller
can render a template once and stamp fresh values per request.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_PREFIX = "[guardproxy mock-upstream: scripted test model, not a real LLM] You said: "
DEFAULT_MODEL = "gpt-4o"
DEFAULT_CHUNK_CHARS = 16


class MockUsage(BaseModel):
    """Usage override; missing counts are computed, ``total_tokens`` defaults to their sum."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_tokens: int | None = Field(default=None, ge=0)
    completion_tokens: int | None = Field(default=None, ge=0)
    total_tokens: int | None = Field(default=None, ge=0)
    prompt_tokens_details: dict[str, int] | None = None
    completion_tokens_details: dict[str, int] | None = None


class MockToolCall(BaseModel):
    """A tool call the fake model makes; ``arguments`` is sent verbatim, valid JSON or not."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    arguments: str = ""
    id: str | None = None


class ScriptedReply(BaseModel):
    """One queued answer. Without ``content`` and ``tool_calls`` the default reply is used, with the
    other fields (delay, usage, model, ...) still applied."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    content: str | None = None
    tool_calls: tuple[MockToolCall, ...] = ()
    finish_reason: str | None = None
    usage: MockUsage | None = None
    status: int | None = Field(default=None, ge=100, le=599)
    error_message: str | None = None
    error_type: str = "server_error"
    delay_ms: int = Field(default=0, ge=0)
    stream_fail_after: int | None = Field(default=None, ge=0)
    chunk_delay_ms: int = Field(default=0, ge=0)
    chunk_chars: int | None = Field(default=None, ge=1)
    model: str | None = None
    # Hostile-model scripting: fields merged over the rendered message (non-streamed), extra choices
    # appended after choice 0, and raw deltas streamed before the finishing chunk.
    raw_message: dict[str, Any] | None = None
    extra_choices: tuple[Any, ...] = ()
    raw_deltas: tuple[dict[str, Any], ...] = ()
    # Sent verbatim as ``usage`` (negative, fractional, huge: whatever a broken provider might send).
    raw_usage: Any = None


_UNSET: Any = object()  # sentinel: no raw usage scripted


@dataclass(frozen=True, slots=True)
class PlannedCall:
    name: str
    arguments: str
    id: str | None


@dataclass(frozen=True, slots=True)
class Plan:
    """A resolved answer, independent of streaming."""

    model: str
    content: str | None
    tool_calls: tuple[PlannedCall, ...]
    finish_reason: str
    usage: dict[str, Any]
    legacy_functions: bool
    chunk_chars: int
    raw_message: dict[str, Any] | None = None
    extra_choices: tuple[Any, ...] = ()
    raw_deltas: tuple[dict[str, Any], ...] = ()
    raw_usage: Any = _UNSET

    @property
    def usage_out(self) -> Any:
        """The ``usage`` sent: the scripted raw value when there is one, else the computed usage."""
        return self.usage if self.raw_usage is _UNSET else self.raw_usage


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    return [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []


def _last_user_text(body: dict[str, Any]) -> str:
    for m in reversed(_messages(body)):
        if m.get("role") == "user":
            return _text_of(m.get("content"))
    return ""


def _declared_tool_names(body: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for tool in body.get("tools") or ():
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.append(fn["name"])
    for fn in body.get("functions") or ():
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.append(fn["name"])
    return [n for n in names if n]


def _demo_tool_calls(text: str, names: list[str]) -> tuple[PlannedCall, ...]:
    """``please apply_credit {"amount": 75}`` -> a call to apply_credit with that JSON text."""
    if not names or "{" not in text:
        return ()
    alternatives = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w.-])({alternatives})\s*(?=\{{)")
    decoder = json.JSONDecoder()
    calls: list[PlannedCall] = []
    pos = 0
    while (m := pattern.search(text, pos)) is not None:
        try:
            value, end = decoder.raw_decode(text, m.end())
        except ValueError:
            pos = m.end()
            continue
        if isinstance(value, dict):
            calls.append(PlannedCall(m.group(1), text[m.end() : end], None))
        pos = end
    return tuple(calls)


def _schema_instance(schema: Any, root: Any, depth: int = 0) -> Any:
    """A small value that satisfies common JSON schemas, so schema-checking proxies accept it."""
    if not isinstance(schema, dict) or depth > 12:
        return "mock"
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return _schema_instance(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            usable = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            return _schema_instance((usable or options)[0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties")
        if isinstance(props, dict) and props:
            return {k: _schema_instance(v, root, depth + 1) for k, v in props.items()}
        return {} if schema.get("additionalProperties") is False else {"note": "mock"}
    if kind == "array":
        return [_schema_instance(schema.get("items"), root, depth + 1)] * int(schema.get("minItems", 0))
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return schema.get("minimum", 0)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "mock" + "x" * max(0, int(schema.get("minLength", 0)) - 4)


def default_answer(body: dict[str, Any]) -> tuple[str | None, tuple[PlannedCall, ...]]:
    """Content and tool calls the unscripted model gives for ``body``."""
    text = _last_user_text(body)
    calls = _demo_tool_calls(text, _declared_tool_names(body))
    if calls:
        return None, calls
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object"):
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        value = _schema_instance(schema, schema) if isinstance(schema, dict) else {"note": "mock"}
        return json.dumps(value), ()
    return DEFAULT_PREFIX + text[:200], ()


def _usage(
    body: dict[str, Any], content: str | None, calls: tuple[PlannedCall, ...], override: MockUsage | None
) -> dict[str, Any]:
    prompt = sum(len(_text_of(m.get("content"))) for m in _messages(body)) // 4 + 1
    completion = (len(content or "") + sum(len(c.arguments) for c in calls)) // 4 + 1
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion}
    if override is not None:
        if override.prompt_tokens is not None:
            usage["prompt_tokens"] = override.prompt_tokens
        if override.completion_tokens is not None:
            usage["completion_tokens"] = override.completion_tokens
    usage["total_tokens"] = (
        override.total_tokens
        if override is not None and override.total_tokens is not None
        else usage["prompt_tokens"] + usage["completion_tokens"]
    )
    if override is not None and override.prompt_tokens_details is not None:
        usage["prompt_tokens_details"] = override.prompt_tokens_details
    if override is not None and override.completion_tokens_details is not None:
        usage["completion_tokens_details"] = override.completion_tokens_details
    return usage


def build_plan(body: dict[str, Any], reply: ScriptedReply | None) -> Plan:
    """Resolve a chat request and an optional scripted reply into what to answer."""
    if reply is not None and {"content", "tool_calls"} & reply.model_fields_set:
        content = reply.content
        calls = tuple(PlannedCall(c.name, c.arguments, c.id) for c in reply.tool_calls)
    else:
        content, calls = default_answer(body)
    legacy = bool(calls) and bool(body.get("functions")) and not body.get("tools")
    if reply is not None and reply.finish_reason:
        finish = reply.finish_reason
    else:
        finish = "function_call" if legacy else "tool_calls" if calls else "stop"
    model = body.get("model")
    if reply is not None and reply.model:
        model = reply.model
    return Plan(
        model=model if isinstance(model, str) else DEFAULT_MODEL,
        content=content,
        tool_calls=calls,
        finish_reason=finish,
        usage=_usage(body, content, calls, reply.usage if reply else None),
        legacy_functions=legacy,
        chunk_chars=(reply.chunk_chars if reply and reply.chunk_chars else DEFAULT_CHUNK_CHARS),
        raw_message=reply.raw_message if reply else None,
        extra_choices=reply.extra_choices if reply else (),
        raw_deltas=reply.raw_deltas if reply else (),
        raw_usage=reply.raw_usage if reply is not None and "raw_usage" in reply.model_fields_set else _UNSET,
    )


def _call_id(call: PlannedCall, token: str, index: int) -> str:
    return call.id if call.id is not None else f"call_{token}_{index}"


def render_completion(plan: Plan, token: str, created: int) -> bytes:
    """The non-streaming ``chat.completion`` body."""
    message: dict[str, Any] = {"role": "assistant", "content": plan.content}
    if plan.tool_calls and plan.legacy_functions:
        first = plan.tool_calls[0]
        message["function_call"] = {"name": first.name, "arguments": first.arguments}
    elif plan.tool_calls:
        message["tool_calls"] = [
            {
                "id": _call_id(c, token, i),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for i, c in enumerate(plan.tool_calls)
        ]
    if plan.raw_message is not None:
        message = {**message, **plan.raw_message}
    return orjson.dumps(
        {
            "id": "chatcmpl-" + token,
            "object": "chat.completion",
            "created": created,
            "model": plan.model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": plan.finish_reason},
                *plan.extra_choices,
            ],
            "usage": plan.usage_out,
        }
    )


def _fragments(text: str, pieces: int) -> list[str]:
    if not text:
        return []
    pieces = min(pieces, len(text))
    cuts = [len(text) * i // pieces for i in range(pieces + 1)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def render_stream(plan: Plan, token: str, created: int, include_usage: bool) -> list[bytes]:
    """SSE events (``data: ...\\n\\n``) of a ``chat.completion.chunk`` stream, ending in ``[DONE]``."""
    head = {
        "id": "chatcmpl-" + token,
        "object": "chat.completion.chunk",
        "created": created,
        "model": plan.model,
    }

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        doc = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            doc["usage"] = None  # OpenAI sends usage: null on every chunk when usage is requested
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    events = [event({"role": "assistant", "content": ""})]
    content = plan.content or ""
    step = plan.chunk_chars
    events.extend(event({"content": content[i : i + step]}) for i in range(0, len(content), step))
    if plan.tool_calls and plan.legacy_functions:
        first = plan.tool_calls[0]
        events.append(event({"function_call": {"name": first.name, "arguments": ""}}))
        events.extend(event({"function_call": {"arguments": f}}) for f in _fragments(first.arguments, 3))
    else:
        for i, c in enumerate(plan.tool_calls):
            opening = {"index": i, "id": _call_id(c, token, i), "type": "function"}
            events.append(event({"tool_calls": [{**opening, "function": {"name": c.name, "arguments": ""}}]}))
            events.extend(
                event({"tool_calls": [{"index": i, "function": {"arguments": f}}]})
                for f in _fragments(c.arguments, 3)
            )
    events.extend(event(d) for d in plan.raw_deltas)
    events.append(event({}, plan.finish_reason))
    if include_usage:
        events.append(b"data: " + orjson.dumps({**head, "choices": [], "usage": plan.usage_out}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def render_error(reply: ScriptedReply) -> bytes:
    """The OpenAI-style error body for a scripted ``status``."""
    message = reply.error_message or "scripted error"
    return orjson.dumps(
        {"error": {"message": message, "type": reply.error_type, "code": None, "param": None}}
    )
