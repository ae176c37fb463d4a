"""Every error the proxy itself returns, in one place.

All refusals use one envelope, the OpenAI error shape plus a decision id::

    {"error": {"message": str, "type": str, "code": str, "param": str | None,
               "decision_id": str | None}}

``code`` is stable and listed in ``docs/errors.md`` (``tests/test_docs_sync.py``
keeps the two in sync). Raise :class:`ProxyError` anywhere on the request path;
the app turns it into the envelope. Never put a secret in ``message``.
"""

from __future__ import annotations

from typing import Any

import orjson

# code -> (HTTP status, OpenAI-style error type)
CODES: dict[str, tuple[int, str]] = {
    "invalid_json": (400, "invalid_request_error"),
    "invalid_request": (400, "invalid_request_error"),
    "idempotency_key_empty": (400, "invalid_request_error"),
    "idempotency_key_too_long": (400, "invalid_request_error"),
    "schema_too_complex": (400, "invalid_request_error"),
    "too_many_tools": (400, "invalid_request_error"),
    "invalid_api_key": (401, "authentication_error"),
    "admin_required": (403, "permission_error"),
    "model_not_allowed": (403, "permission_error"),
    "tool_not_allowed": (403, "permission_error"),
    "policy_denied": (403, "permission_error"),
    "unpriced_model": (403, "permission_error"),
    "model_not_found": (404, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "decision_not_found": (404, "invalid_request_error"),
    "body_timeout": (408, "invalid_request_error"),
    "idempotency_in_flight": (409, "conflict_error"),
    "approval_not_pending": (409, "conflict_error"),
    "request_too_large": (413, "invalid_request_error"),
    "unsupported_media_type": (415, "invalid_request_error"),
    "idempotency_key_reused": (422, "invalid_request_error"),
    "schema_validation_failed": (422, "invalid_request_error"),
    "budget_exceeded": (429, "rate_limit_error"),
    "internal_error": (500, "server_error"),
    "upstream_error": (502, "upstream_error"),
    "output_too_large": (502, "upstream_error"),
    "state_unavailable": (503, "service_unavailable"),
    "upstream_timeout": (504, "upstream_error"),
}


class ProxyError(Exception):
    """A refusal with a stable code; turned into the error envelope by the app."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        param: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if code not in CODES:
            raise ValueError(f"unregistered error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.status = status if status is not None else CODES[code][0]
        self.type = CODES[code][1]
        self.headers = headers or {}
        self.extra = extra or {}


def envelope(err: ProxyError, decision_id: str | None = None) -> bytes:
    """The JSON body of an error response."""
    body: dict[str, Any] = {
        "message": err.message,
        "type": err.type,
        "code": err.code,
        "param": err.param,
        "decision_id": decision_id,
    }
    body.update(err.extra)
    return orjson.dumps({"error": body})


def sse_error_event(err: ProxyError, decision_id: str | None = None) -> bytes:
    """The SSE event that ends a stream which failed midway."""
    return b"data: " + envelope(err, decision_id) + b"\n\n"
