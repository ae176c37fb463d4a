"""The hot route served straight from ASGI, in front of the FastAPI app.

``POST /v1/chat/completions`` is the request every agent turn makes. It needs none of FastAPI's
routing, dependency exit stack or exception middleware (the handler turns every refusal into the error
envelope itself), so :class:`FastPath` calls it directly and hands everything else, lifespan
included, to the app. Measured in ``bench/``; behaviour is the same either way.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request

from proxy.chat import chat_completions
from proxy.errors import ProxyError
from proxy.responses import error_response

log = logging.getLogger("guardproxy")
_HOT = frozenset({"/v1/chat/completions", "/chat/completions"})


class FastPath:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in _HOT:
            await self.app(scope, receive, send)
            return
        scope["app"] = self.app  # what request.app resolves to, as under the router
        try:
            response = await chat_completions(Request(scope, receive))
        except Exception:
            log.exception("unexpected error on %s", scope["path"])
            err = ProxyError("internal_error", "internal error; see the proxy log")
            response = error_response(err)
        await response(scope, receive, send)
