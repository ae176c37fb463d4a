"""What an upstream chat answer must look like before the proxy reads it.

A provider (or a hostile model behind a compatible API) can send anything: ``tool_calls: 5``, a message
that is a list, ``usage.completion_tokens: -5``. Every shape the proxy reads is checked here first, so a
body it cannot read is one clear ``502 upstream_error`` (with the reservation released by the caller),
never a ``TypeError`` deep in the pipeline, and usage numbers are validated before they touch metrics or
budgets. Unknown fields pass through untouched: only the fields the proxy reads are constrained.
"""

from __future__ import annotations

from typing import Any

from proxy.errors import ProxyError
from rules.strictjson import StrictJSONError, loads_strict

_USAGE_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")
_TEXT_FIELDS = ("content", "refusal", "reasoning_content", "reasoning", "role")
_MAX_UPSTREAM_BYTES = 1 << 30  # the transport bounds sizes; strictness here is about shape and depth


def unreadable(what: str) -> ProxyError:
    return ProxyError("upstream_error", f"upstream sent an unreadable answer: {what}")


def parse(payload: bytes, *, max_depth: int) -> Any:
    """Strict JSON of an upstream body or stream chunk (duplicate keys, NaN, nesting past ``max_depth``
    are unreadable)."""
    try:
        return loads_strict(payload, max_depth=max_depth, max_string=_MAX_UPSTREAM_BYTES,
                            max_bytes=_MAX_UPSTREAM_BYTES)
    except StrictJSONError as exc:
        raise unreadable(f"not strict JSON ({exc.reason})") from None


def _count(value: Any, where: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise unreadable(f"{where} must be a non-negative integer")


def usage(value: Any) -> dict[str, Any] | None:
    """The usage object, checked: counts are non-negative integers, details are objects of such counts."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise unreadable("usage must be an object")
    for name in _USAGE_COUNTS:
        _count(value.get(name), f"usage.{name}")
    for name, detail in value.items():
        if name.endswith("_details") and detail is not None:
            if not isinstance(detail, dict):
                raise unreadable(f"usage.{name} must be an object")
            for sub, n in detail.items():
                _count(n, f"usage.{name}.{sub}")
    return value


def _text(value: Any, where: str) -> None:
    if value is not None and not isinstance(value, str):
        raise unreadable(f"{where} must be a string")


def _call(call: Any, where: str, *, delta: bool) -> None:
    if not isinstance(call, dict):
        raise unreadable(f"{where} must be an object")
    fn = call.get("function")
    if delta:
        idx = call.get("index", 0)
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            raise unreadable(f"{where}.index must be a non-negative integer")
        if fn is None:
            fn = {}
    _text(call.get("id"), f"{where}.id")
    if not isinstance(fn, dict):
        raise unreadable(f"{where}.function must be an object")
    for key in ("name", "arguments"):
        value = fn.get(key)
        if delta:
            _text(value, f"{where}.function.{key}")
        elif not isinstance(value, str) and not (key == "arguments" and value is None):
            raise unreadable(f"{where}.function.{key} must be a string")


def _message(msg: Any, where: str, *, delta: bool) -> None:
    if not isinstance(msg, dict):
        raise unreadable(f"{where} must be an object")
    for key in _TEXT_FIELDS:
        if key == "content" and isinstance(msg.get(key), list):
            for i, part in enumerate(msg[key]):
                if not isinstance(part, dict):
                    raise unreadable(f"{where}.content[{i}] must be an object")
            continue
        _text(msg.get(key), f"{where}.{key}")
    calls = msg.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise unreadable(f"{where}.tool_calls must be an array")
        for i, c in enumerate(calls):
            _call(c, f"{where}.tool_calls[{i}]", delta=delta)
    fc = msg.get("function_call")
    if fc is not None:
        if not isinstance(fc, dict):
            raise unreadable(f"{where}.function_call must be an object")
        _call({"function": fc}, f"{where}.function_call", delta=delta)
    audio = msg.get("audio")
    if audio is not None and not isinstance(audio, dict):
        raise unreadable(f"{where}.audio must be an object")


def completion(data: Any) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` body the proxy can read, or ``502 upstream_error``."""
    if not isinstance(data, dict):
        raise unreadable("the body is not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise unreadable("no choices")
    for i, choice in enumerate(choices):
        if not isinstance(choice, dict):
            raise unreadable(f"choices[{i}] must be an object")
        message = choice.get("message")
        if message is None:
            choice["message"] = message = {}
        _message(message, f"choices[{i}].message", delta=False)
        _text(choice.get("finish_reason"), f"choices[{i}].finish_reason")
    usage(data.get("usage"))
    return data


def chunk(data: Any) -> dict[str, Any]:
    """A ``chat.completion.chunk`` the relay can read, or ``502 upstream_error``."""
    if not isinstance(data, dict):
        raise unreadable("a stream chunk is not an object")
    choices = data.get("choices")
    if choices is not None:
        if not isinstance(choices, list):
            raise unreadable("stream chunk choices must be an array")
        for i, choice in enumerate(choices):
            if not isinstance(choice, dict):
                raise unreadable(f"stream choices[{i}] must be an object")
            delta = choice.get("delta")
            if delta is not None:
                _message(delta, f"choices[{i}].delta", delta=True)
            _text(choice.get("finish_reason"), f"choices[{i}].finish_reason")
    usage(data.get("usage"))
    return data
