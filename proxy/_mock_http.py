"""Minimal raw-asyncio HTTP/1.1 server used by the mock upstream.

Just enough HTTP for a fast fake model: ``httptools`` parsing (Content-Length and chunked request
bodies), keep-alive and pipelining (replies leave in request order), ``Content-Length`` responses and
``Transfer-Encoding: chunked`` SSE streams that may be paced or cut short on purpose. The handler is a
plain synchronous function returning a reply *description*; every sleep and write happens here, so the
routing and rendering code stays free of I/O.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import cast

import httptools
import orjson


@dataclass(slots=True)
class Request:
    """One parsed request; ``headers`` keeps raw (name, value) pairs in arrival order."""

    method: bytes
    path: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(slots=True)
class Response:
    """A complete reply sent with Content-Length, after ``delay`` seconds."""

    status: int
    body: bytes
    content_type: bytes = b"application/json"
    delay: float = 0.0


@dataclass(slots=True)
class StreamResponse:
    """An SSE reply: each event becomes one HTTP chunk.

    ``fail_after`` set means: send at most that many events, then close the connection without the
    terminating zero-length chunk (a broken upstream).
    """

    events: list[bytes]
    delay: float = 0.0
    chunk_delay: float = 0.0
    fail_after: int | None = None
    # Optional fast path: all events already chunk-framed, terminator included (see frame_events).
    framed: bytes | None = None


Handler = Callable[[Request], Response | StreamResponse]
# Told when a paced stream ends: (completed, events written). A stream the client abandoned reports
# completed=False, so tests can see that the proxy cancelled its upstream stream.
StreamObserver = Callable[[bool, int], None]

_STATUS_LINES: Mapping[int, bytes] = {
    int(s): b"HTTP/1.1 %d %s" % (int(s), s.phrase.encode()) for s in HTTPStatus
}


def _status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown" % status


def encode_response(resp: Response, keep_alive: bool) -> bytes:
    """Serialise a Content-Length response, head and body in one buffer."""
    return (
        b"%s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n"
        % (
            _status_line(resp.status),
            resp.content_type,
            len(resp.body),
            b"" if keep_alive else b"connection: close\r\n",
        )
        + resp.body
    )


def encode_stream_head(keep_alive: bool) -> bytes:
    """Response head of an SSE stream with chunked transfer encoding."""
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\n%s\r\n" % (b"" if keep_alive else b"connection: close\r\n")
    )


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_LAST_CHUNK = b"0\r\n\r\n"


def frame_events(events: list[bytes]) -> bytes:
    """A whole SSE body in chunked framing, terminating chunk included."""
    return b"".join([*(encode_chunk(e) for e in events), _LAST_CHUNK])


_BAD_REQUEST = encode_response(
    Response(400, b'{"error":{"message":"malformed HTTP request","type":"invalid_request_error"}}'),
    keep_alive=False,
)


class HttpProtocol(asyncio.Protocol):
    """One connection. Replies without sleeps are written synchronously from ``data_received``; a
    reply that sleeps runs in a task, and requests pipelined behind it wait in ``_backlog``."""

    def __init__(self, handler: Handler, connections: set[HttpProtocol],
                 on_stream_end: StreamObserver | None = None) -> None:
        self._handler = handler
        self._on_stream_end = on_stream_end
        self._connections = connections
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        # Not None while a delayed reply is in flight; later requests queue here to keep order.
        self._backlog: deque[tuple[Request, bool]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport, hence a cast, not an isinstance.
        self._transport = cast(asyncio.Transport, transport)
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._connections.discard(self)
        if self._task is not None:
            self._task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # e.g. an h2c upgrade offer: the request was already answered over HTTP/1.1
        except httptools.HttpParserError:
            if not self._closed and self._transport is not None:
                self._transport.write(_BAD_REQUEST)
                self.close()

    def close(self) -> None:
        """Close after flushing what was already written."""
        self._closed = True
        if self._transport is not None:
            self._transport.close()

    # -- httptools callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        # Clients that wait for "100 Continue" before sending the body would otherwise stall.
        if len(name) == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            assert self._transport is not None
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._closed:
            return
        req = Request(
            self._parser.get_method(),
            self._url.split(b"?", 1)[0],
            self._headers,
            b"".join(self._body) if len(self._body) != 1 else self._body[0],
        )
        keep_alive = bool(self._parser.should_keep_alive())
        if self._backlog is not None:
            self._backlog.append((req, keep_alive))
            return
        reply = self._call_handler(req)
        if reply.delay or (isinstance(reply, StreamResponse) and reply.chunk_delay):
            self._backlog = deque()
            self._task = asyncio.get_running_loop().create_task(self._reply_later(reply, keep_alive))
        else:
            self._write_now(reply, keep_alive)

    def _call_handler(self, req: Request) -> Response | StreamResponse:
        try:
            return self._handler(req)
        except Exception as exc:  # a handler bug must answer, not hang the client
            message = orjson.dumps(
                {"error": {"message": f"mock-upstream bug: {exc!r}", "type": "server_error"}}
            )
            return Response(500, message)

    # -- writing ----------------------------------------------------------------------------------
    def _write_now(self, reply: Response | StreamResponse, keep_alive: bool) -> None:
        assert self._transport is not None
        if isinstance(reply, Response):
            self._transport.write(encode_response(reply, keep_alive))
        else:
            if reply.framed is not None and reply.fail_after is None:
                self._transport.write(encode_stream_head(keep_alive) + reply.framed)
                if not keep_alive:
                    self.close()
                return
            events = reply.events if reply.fail_after is None else reply.events[: reply.fail_after]
            parts = [encode_stream_head(keep_alive)]
            parts.extend(encode_chunk(e) for e in events)
            if reply.fail_after is None:
                parts.append(_LAST_CHUNK)
            self._transport.write(b"".join(parts))
            if reply.fail_after is not None:
                self.close()
        if not keep_alive:
            self.close()

    async def _reply_later(self, reply: Response | StreamResponse, keep_alive: bool) -> None:
        try:
            await self._write_later(reply, keep_alive)
            while self._backlog and not self._closed:
                req, keep_alive = self._backlog.popleft()
                await self._write_later(self._call_handler(req), keep_alive)
        finally:
            self._backlog = None
            self._task = None

    async def _write_later(self, reply: Response | StreamResponse, keep_alive: bool) -> None:
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if self._closed:
            return
        if isinstance(reply, Response) or not reply.chunk_delay:
            self._write_now(reply, keep_alive)
            return
        assert self._transport is not None
        self._transport.write(encode_stream_head(keep_alive))
        events = reply.events if reply.fail_after is None else reply.events[: reply.fail_after]
        sent = 0
        try:
            for i, event in enumerate(events):
                if i:
                    await asyncio.sleep(reply.chunk_delay)
                    if self._closed:
                        return
                self._transport.write(encode_chunk(event))
                sent += 1
        finally:
            if self._on_stream_end is not None:
                self._on_stream_end(sent == len(events) and not self._closed, sent)
        if reply.fail_after is not None:
            self.close()
            return
        self._transport.write(_LAST_CHUNK)
        if not keep_alive:
            self.close()
