"""``guardproxy mock-upstream``: a fast, scriptable OpenAI-compatible fake model.

Endpoints: ``POST /v1/chat/completions`` (JSON or SSE), ``GET /v1/models``, ``GET /healthz``, and the
test controls ``POST /_mock/script`` (queue replies, FIFO), ``POST /_mock/reset``, ``GET /_mock/calls``
and ``GET /_mock/stats``. Reply fields are documented on :class:`proxy._mock_replies.ScriptedReply`.

It is the floor in benchmarks, so it runs on raw asyncio + httptools (:mod:`proxy._mock_http`) and
caches default answers by request body: a repeated unscripted request costs two ``bytes.replace``
calls (fresh id and ``created``) instead of a JSON parse and render. The call log keeps raw bytes and
is decoded only when ``/_mock/calls`` is read.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from proxy._mock_http import HttpProtocol, Request, Response, StreamResponse, frame_events
from proxy._mock_replies import ScriptedReply, build_plan, render_completion, render_error, render_stream

__all__ = ["MockControl", "MockUpstream", "ScriptedReply", "run", "start"]

CALL_LOG_LIMIT = 10_000
CALL_LOG_BYTES = 64 * 1024 * 1024  # long-history benchmarks send 400 KB bodies: bound memory, not just count
_CACHE_BYTES = 32 << 20  # cleared wholesale when full: benchmarks repeat a handful of bodies
_BASE_MODELS = ("gpt-4o", "gpt-4o-mini")
_CHAT_PATHS = frozenset({b"/v1/chat/completions", b"/chat/completions"})


class _Script(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    replies: tuple[ScriptedReply, ...]


def _json(status: int, doc: Any) -> Response:
    return Response(status, orjson.dumps(doc))


def _error(status: int, message: str, kind: str = "invalid_request_error") -> Response:
    return _json(status, {"error": {"message": message, "type": kind, "code": None, "param": None}})


class MockUpstream:
    """The fake model's state (script queue, call log, counters, answer cache) and its router."""

    def __init__(self) -> None:
        self.replies: deque[ScriptedReply] = deque()
        # Raw (path, headers, body); bounded so a long benchmark cannot grow memory without limit.
        self.calls: deque[tuple[bytes, list[tuple[bytes, bytes]], bytes]] = deque(maxlen=CALL_LOG_LIMIT)
        self._call_bytes = 0
        self.chat_requests = 0
        self.stream_stats = {"completed": 0, "abandoned": 0, "events_sent": 0}  # paced streams only
        self.models: dict[str, None] = dict.fromkeys(_BASE_MODELS)
        self.connections: set[HttpProtocol] = set()
        # Cached default answers are rendered with a placeholder id and created, stamped per request.
        # Placeholder and real values have equal lengths, so chunk sizes are unaffected.
        self._placeholder_token = os.urandom(12).hex().encode()
        self._placeholder_created = b'"created":1000000001'
        self._token_prefix = os.urandom(6).hex().encode()
        self._created_at = 0
        self._created_field = b""
        self._counter: Iterator[int] = itertools.count(1)
        self._cache: dict[bytes, tuple[bool, bytes]] = {}
        self._cache_bytes = 0
        self._routes: dict[tuple[bytes, bytes], Callable[[Request], Response]] = {
            (b"GET", b"/v1/models"): self._list_models,
            (b"GET", b"/models"): self._list_models,
            (b"GET", b"/healthz"): lambda _: Response(200, b'{"ok":true}'),
            (b"POST", b"/_mock/script"): self._script,
            (b"POST", b"/_mock/reset"): self._reset,
            (b"GET", b"/_mock/calls"): self._calls,
            (b"GET", b"/_mock/stats"): lambda _: _json(200, {"chat_requests": self.chat_requests,
                                                             "streams": self.stream_stats}),
        }

    def handle(self, req: Request) -> Response | StreamResponse:
        """Answer one request (the :class:`HttpProtocol` handler)."""
        if req.path in _CHAT_PATHS and req.method == b"POST":
            return self._chat(req)
        route = self._routes.get((req.method, req.path))
        if route is not None:
            return route(req)
        if any(path == req.path for _, path in self._routes) or req.path in _CHAT_PATHS:
            return _error(405, f"method {req.method.decode()} not allowed")
        return _error(404, f"no route {req.path.decode(errors='replace')}")

    def protocol(self) -> HttpProtocol:
        """Protocol factory for ``loop.create_server``."""
        return HttpProtocol(self.handle, self.connections, self._stream_ended)

    def _stream_ended(self, completed: bool, events: int) -> None:
        self.stream_stats["completed" if completed else "abandoned"] += 1
        self.stream_stats["events_sent"] += events

    def close_connections(self) -> None:
        for conn in list(self.connections):
            conn.close()

    # -- chat -------------------------------------------------------------------------------------
    def _chat(self, req: Request) -> Response | StreamResponse:
        self.chat_requests += 1
        if len(self.calls) == self.calls.maxlen:
            self._call_bytes -= len(self.calls[0][2])  # about to be dropped by the deque itself
        self.calls.append((req.path, req.headers, req.body))
        self._call_bytes += len(req.body)
        while self._call_bytes > CALL_LOG_BYTES and len(self.calls) > 1:
            self._call_bytes -= len(self.calls.popleft()[2])
        if not self.replies:
            hit = self._cache.get(req.body)
            if hit is not None:
                return self._stamp(*hit)
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError:
            return _error(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        if isinstance(body.get("model"), str):
            self.models.setdefault(body["model"])
        stream = body.get("stream") is True
        options = body.get("stream_options")
        include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
        reply = self.replies.popleft() if self.replies else None
        if reply is None:
            plan = build_plan(body, None)
            token = self._placeholder_token.decode()
            rendered = (
                frame_events(render_stream(plan, token, 1000000001, include_usage))
                if stream
                else render_completion(plan, token, 1000000001)
            )
            self._cache_bytes += len(req.body) + len(rendered)
            if self._cache_bytes > _CACHE_BYTES:
                self._cache.clear()
                self._cache_bytes = len(req.body) + len(rendered)
            self._cache[req.body] = (stream, rendered)
            return self._stamp(stream, rendered)
        delay = reply.delay_ms / 1000
        if reply.status is not None and reply.status != 200:
            return Response(reply.status, render_error(reply), delay=delay)
        plan = build_plan(body, reply)
        token, created = self._next_token().decode(), int(time.time())
        if not stream:
            return Response(200, render_completion(plan, token, created), delay=delay)
        return StreamResponse(
            render_stream(plan, token, created, include_usage),
            delay=delay,
            chunk_delay=reply.chunk_delay_ms / 1000,
            fail_after=reply.stream_fail_after,
        )

    def _next_token(self) -> bytes:
        return b"%s%012x" % (self._token_prefix, next(self._counter) & 0xFFFFFFFFFFFF)

    def _stamp(self, stream: bool, rendered: bytes) -> Response | StreamResponse:
        """A cached default answer with a fresh id and ``created``; ``rendered`` is a JSON body or,
        for streams, the chunk-framed SSE body."""
        token = self._next_token()
        now = int(time.time())
        if now != self._created_at:
            self._created_at, self._created_field = now, b'"created":%d' % now
        body = rendered.replace(self._placeholder_token, token).replace(
            self._placeholder_created, self._created_field
        )
        return StreamResponse([], framed=body) if stream else Response(200, body)

    # -- controls ---------------------------------------------------------------------------------
    def _list_models(self, _: Request) -> Response:
        data = [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": "guardproxy-mock"}
            for m in self.models
        ]
        return _json(200, {"object": "list", "data": data})

    def _script(self, req: Request) -> Response:
        try:
            script = _Script.model_validate_json(req.body)
        except ValidationError as exc:
            return _error(400, f"bad script: {exc}")
        self.replies.extend(script.replies)
        return _json(200, {"queued": len(self.replies)})

    def _reset(self, _: Request) -> Response:
        self.replies.clear()
        self.calls.clear()
        self._call_bytes = 0
        self.chat_requests = 0
        self.stream_stats = dict.fromkeys(self.stream_stats, 0)
        return _json(200, {"ok": True})

    def _calls(self, _: Request) -> Response:
        def parsed(body: bytes) -> Any:
            try:
                return orjson.loads(body)
            except orjson.JSONDecodeError:
                return body.decode(errors="replace")

        calls = [
            {
                "path": path.decode(errors="replace"),
                "headers": {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers},
                "body": parsed(body),
            }
            for path, headers, body in self.calls
        ]
        return _json(200, {"calls": calls})


async def start(host: str, port: int, *, app: MockUpstream | None = None) -> tuple[asyncio.Server, int]:
    """Listen on ``host:port`` (0 picks a free port) in the running loop; returns the server and port.

    Pass ``app`` to keep a handle on the state (e.g. ``app.close_connections()`` at shutdown).
    """
    app = app if app is not None else MockUpstream()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(app.protocol, host, port, reuse_address=True, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    return server, int(bound)


async def _serve(host: str, port: int) -> None:
    app = MockUpstream()
    server, bound = await start(host, port, app=app)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    shown = f"[{host}]" if ":" in host else host
    print(f"mock-upstream listening on http://{shown}:{bound} (scripted model, not a real LLM)", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        app.close_connections()
        await server.wait_closed()


def run(host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM (blocking), on uvloop when it is installed."""
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(host, port))


class MockControl:
    """Synchronous test helper for a running mock: ``MockControl("http://127.0.0.1:PORT")``."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.timeout = timeout

    def _call(self, method: str, path: str, doc: Any = None) -> Any:
        data = orjson.dumps(doc) if doc is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("content-type", "application/json")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return orjson.loads(resp.read())

    def script(self, *replies: dict[str, Any]) -> int:
        """Queue replies; returns the queue length."""
        return int(self._call("POST", "/_mock/script", {"replies": list(replies)})["queued"])

    def reset(self) -> None:
        self._call("POST", "/_mock/reset", {})

    def calls(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/_mock/calls")["calls"])

    def stats(self) -> dict[str, Any]:
        return dict(self._call("GET", "/_mock/stats"))
