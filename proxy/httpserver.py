"""The HTTP/1.1 protocol ``guardproxy serve`` runs: uvicorn's httptools protocol, with the proxy's own rules.

uvicorn answers some requests itself, before or instead of the app, in plain text: the parser's 400
(a negative ``Content-Length``, a malformed request line, bad chunked encoding), the 500 when an app
raises or returns before answering (a request cut off at shutdown), the 503 of ``limit_concurrency``.
:class:`GuardHttpProtocol` writes each as the JSON error envelope instead (``invalid_request``,
``internal_error``, ``state_unavailable``), so every answer the proxy makes has one shape.

It also bounds how long a client may take to deliver a request, which uvicorn does not: a connection
that sends no request, a request whose headers never complete (``408 body_timeout``) or whose body is
still trickling in after the app has answered is closed after ``request_timeout_s``. While the app is
handling a request its own timeouts apply (the body read in :mod:`proxy.body`, the upstream's).
The proxy serves no WebSockets or h2c: an ``Upgrade`` request is answered as HTTP/1.1. The parser stops
reading at its headers, so the connection closes after the answer (a pipelined request behind it would
be dropped unseen), and one that carries a body is refused (the body would be lost, not read as empty).

Written against uvicorn 0.54 (``httptools_impl``); the overridden hooks are uvicorn's own methods.
"""

from __future__ import annotations

import asyncio
import functools
from asyncio import TimerHandle
from typing import Any, cast

from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from proxy.errors import ProxyError, envelope

ABORT_EXTENSION = "guardproxy.abort"  # scope["extensions"] key: drop this request's connection now


def http_protocol(request_timeout_s: float) -> type[asyncio.Protocol]:
    """The protocol to hand to ``uvicorn.run(http=...)``; picklable, so ``--workers N`` can use it too."""
    # uvicorn only ever calls it with its keyword arguments, as it would the class itself.
    return cast(type[asyncio.Protocol], functools.partial(GuardHttpProtocol, request_timeout_s=request_timeout_s))


def _error_head(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode("ascii")),
            (b"connection", b"close")]


async def _over_capacity(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    err = ProxyError("state_unavailable", "the proxy is at its concurrency limit; retry with backoff")
    body = envelope(err)
    await send({"type": "http.response.start", "status": err.status, "headers": _error_head(body)})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Cycle(RequestResponseCycle):
    """uvicorn's request/response cycle whose last-resort 500 is the envelope."""

    async def send_500_response(self) -> None:
        # The app raised or returned before answering; the cause is in the log ("Exception in ASGI application").
        err = ProxyError("internal_error", "internal error; see the proxy log")
        body = envelope(err)
        await self.send({"type": "http.response.start", "status": err.status, "headers": _error_head(body)})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})


class GuardHttpProtocol(HttpToolsProtocol):
    """One client connection: uvicorn's httptools protocol, envelope answers, a bound on slow requests."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, request_timeout_s: float = 30.0) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.request_timeout_s = request_timeout_s
        self._deadline: TimerHandle | None = None
        self._receiving = False  # a request has begun and is not fully received yet
        self._in_head = False  # ... and its headers are not complete yet
        self._refusal: ProxyError | None = None  # why a parser callback failed the request, if it did

    # -- the envelope for uvicorn's own answers ------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:  # a 400 now would be spliced into the response on the wire
                self.transport.close()
                return
            cycle.disconnected = True  # the app waiting for this body must not answer after us
            cycle.message_event.set()
        self._write_error(self._refusal or ProxyError("invalid_request", "invalid HTTP request"))

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        cycle.__class__ = _Cycle  # same layout, one method changed: uvicorn builds the cycle by name
        # A stream whose client stops reading is cut by the app (proxy.sse): this lets it drop the
        # connection at once, unflushed bytes and all, rather than leave a socket nobody drains.
        scope = cast(dict[str, Any], cycle.scope)
        scope.setdefault("extensions", {})[ABORT_EXTENSION] = functools.partial(self._abort, cycle)
        super()._start_asgi_task(cycle, _over_capacity if app is service_unavailable else app)

    def _abort(self, cycle: RequestResponseCycle) -> None:
        cycle.disconnected = True
        cycle.message_event.set()
        if not self.transport.is_closing():
            self.transport.abort()

    def _write_error(self, err: ProxyError) -> None:
        body = envelope(err)
        content = [STATUS_LINE[err.status]]
        for name, value in [*self.server_state.default_headers, *_error_head(body)]:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend([b"\r\n", body])
        self.transport.write(b"".join(content))
        self.transport.close()

    # -- Upgrade (WebSocket, h2c): never honoured ----------------------------------------------------

    def _should_upgrade_to_ws(self) -> bool:
        return False

    def _unsupported_upgrade_warning(self) -> None:
        pass  # not a problem: the request is served as plain HTTP/1.1

    # -- how long a client may take to deliver a request ---------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.request_timeout_s)  # a connection that never sends a request

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Armed only when a read ends with a request still incomplete (or with bytes that start none),
        # so a request that arrives in one read costs no timer; the bound runs from that first read.
        if self._deadline is None and not self.transport.is_closing() and (self._receiving or self._idle()):
            self._arm(self.request_timeout_s)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._receiving = self._in_head = True
        self._disarm()  # the connection's idle bound ends; data_received arms the request's own

    def on_headers_complete(self) -> None:
        self._in_head = False
        upgrade = self.parser.should_upgrade()
        if upgrade and any(n == b"transfer-encoding" or (n == b"content-length" and v.strip() != b"0")
                           for n, v in self.headers):
            self._refusal = ProxyError("invalid_request", "Upgrade is not supported on a request with a body; "
                                                          "send it without the Upgrade header")
            raise ValueError("upgrade with a body")  # the parser fails the request: send_400_response
        super().on_headers_complete()
        if upgrade:
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._receiving = False
        self._disarm()
        if self.cycle.response_complete:
            # Answered before the body was in: uvicorn's keep-alive timer, armed at the answer, was
            # cancelled by the body's reads; the connection is idle now and needs a bound again.
            self._arm(self.timeout_keep_alive)

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self, delay: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(delay, self._on_deadline)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_deadline(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if not self._idle():
            # The app is handling a request: its body read and upstream call have their own bounds.
            self._arm(self.request_timeout_s)
            return
        if self._in_head:
            self._write_error(ProxyError("body_timeout", f"the request was not received within "
                                                         f"{self.request_timeout_s:g} s"))
        else:  # no request at all, or the rest of a body nobody reads any more
            self.transport.close()
