"""Reading and checking request bodies: size first, then strict JSON, then types.

The size limit is enforced while reading (413 before any parsing) and the whole
read is bounded in time (408: a client trickling its body must not hold a
connection). JSON is parsed strictly (duplicate keys, NaN and Infinity are
errors, nesting is bounded), because the proxy may forward the original bytes
and an upstream parser that keeps the *first* duplicate must never see a
different request than the policy did.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import ClientDisconnect, Request

from proxy.errors import ProxyError
from rules.strictjson import StrictJSONError, loads_strict


async def read_raw(request: Request, limit: int, *, timeout_s: float = 30.0) -> bytes:
    """The request body: at most ``limit`` bytes, all of it within ``timeout_s`` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None:
        # Only digits: int() would also take "-5", "+5", " 5" and "1_0". The HTTP parser refuses most of
        # these before the app runs; this keeps the rule in one place whatever the server in front.
        if not (declared.isascii() and declared.isdigit()):
            raise ProxyError("invalid_request", "invalid Content-Length header", param="Content-Length")
        if int(declared) > limit:
            raise ProxyError("request_too_large", f"request body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ProxyError("request_too_large", f"request body exceeds {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        # Close: the rest of a body this slow is not worth reading on a kept-alive connection.
        raise ProxyError("body_timeout", f"request body not received within {timeout_s:g} s",
                         headers={"connection": "close"}) from None
    except ClientDisconnect:
        raise ProxyError("invalid_request", "client disconnected while sending the body") from None
    return b"".join(chunks)


async def read_json_body(request: Request, limit: int, *, max_depth: int = 64,
                         timeout_s: float = 30.0) -> tuple[bytes, dict[str, Any]]:
    """The body as a JSON object: strict JSON, at most ``limit`` bytes, nested at most ``max_depth`` deep."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype not in ("application/json", ""):
        raise ProxyError("unsupported_media_type", "send the body as application/json")
    raw = await read_raw(request, limit, timeout_s=timeout_s)
    if not raw:
        raise ProxyError("invalid_json", "request body is empty; expected a JSON object")
    try:
        body = loads_strict(raw, max_depth=max_depth, max_string=limit, max_bytes=limit)
    except StrictJSONError as exc:
        raise ProxyError("invalid_json", f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProxyError("invalid_json", "request body must be a JSON object")
    return raw, body


def _type_error(param: str, expected: str) -> ProxyError:
    return ProxyError("invalid_request", f"{param} must be {expected}", param=param)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def validate_chat_body(body: dict[str, Any]) -> None:
    """The type checks an OpenAI-compatible API makes; everything else passes through untouched."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _type_error("model", "a non-empty string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _type_error("messages", "a non-empty array")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _type_error(f"messages[{i}]", "an object with a string role")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise _type_error("stream", "a boolean")
    for name in ("max_tokens", "max_completion_tokens", "n"):
        v = body.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise _type_error(name, "a positive integer")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v is not None and not _is_number(v):
            raise _type_error(name, "a number")
    for name in ("tools", "functions"):
        v = body.get(name)
        if v is not None and not isinstance(v, list):
            raise _type_error(name, "an array")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise _type_error("stream_options", "an object")
    rf = body.get("response_format")
    if rf is not None and not isinstance(rf, dict):
        raise _type_error("response_format", "an object")
