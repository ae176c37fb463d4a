"""The proxy's own JSON responses: a document, or the one error envelope (see :mod:`proxy.errors`)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from proxy.errors import ProxyError, envelope


def json_response(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json")


def error_response(err: ProxyError, decision_id: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    """The error envelope with the error's own headers (``Retry-After``...) plus any given."""
    return Response(envelope(err, decision_id), status_code=err.status, media_type="application/json",
                    headers={**err.headers, **(headers or {})})
