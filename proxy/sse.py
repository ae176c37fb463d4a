"""The ASGI side of a relayed stream: it notices when the client goes away or stops reading.

Starlette's ``StreamingResponse`` would keep pulling events (and so keep the upstream generating and
billing) into a connection nobody reads, and a client that stops reading would hold the upstream
connection for as long as it likes. :class:`RelayResponse` instead:

- watches ``receive`` for ``http.disconnect`` (FIN or RST) and then cancels the producer at once;
- bounds every write by ``write_timeout_s``: a client that accepts nothing for that long is cut off;
- always closes the body generator (whose ``finally`` settles the request and closes the upstream), and
  reports how the stream ended: ``completed``, ``client_disconnected`` or ``client_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response

ABORT_EXTENSION = "guardproxy.abort"  # offered by proxy.httpserver (the server guardproxy serve runs)
ENDED_COMPLETED = "completed"
ENDED_DISCONNECTED = "client_disconnected"
ENDED_TIMEOUT = "client_timeout"
_YIELD_EVERY = 8  # events sent between two turns given to the event loop


class RelayResponse(Response):
    """An SSE response whose body is an async generator of already framed events."""

    def __init__(self, body: AsyncIterator[bytes], headers: dict[str, str], *, write_timeout_s: float,
                 on_end: Callable[[str], None]) -> None:
        # Not Response.__init__: there is no body to render; the headers are sent by _produce.
        self.events = body
        self.status_code = 200
        self.background = None
        self.sse_headers = {**headers, "content-type": "text/event-stream; charset=utf-8",
                            "cache-control": "no-cache"}
        self.write_timeout_s = write_timeout_s
        self.on_end = on_end
        self._gone = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        ended = ENDED_DISCONNECTED  # also what a cancelled server task (shutdown) amounts to
        producer = asyncio.ensure_future(self._produce(send))
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            done, _ = await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if producer in done:
                ended = producer.result()
                if ended == ENDED_TIMEOUT:
                    abort = (scope.get("extensions") or {}).get(ABORT_EXTENSION)
                    if abort is not None:
                        abort()  # a reader that takes nothing: drop its connection, buffers and all
            else:
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await producer
        finally:
            watcher.cancel()
            if not producer.done():
                producer.cancel()
            with contextlib.suppress(Exception):
                await self.events.aclose()  # type: ignore[attr-defined]  # the relay's finally: settle, close the upstream, drop buffers
            self.on_end(ended)

    async def _send(self, send: Any, message: dict[str, Any]) -> None:
        async with asyncio.timeout(self.write_timeout_s):
            await send(message)

    async def _produce(self, send: Any) -> str:
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.sse_headers.items()]
        try:
            await self._send(send, {"type": "http.response.start", "status": self.status_code, "headers": raw})
            n = 0
            async for chunk in self.events:
                if self._gone:
                    return ENDED_DISCONNECTED
                await self._send(send, {"type": "http.response.body", "body": chunk, "more_body": True})
                n += 1
                if n % _YIELD_EVERY == 0:
                    # A fast upstream keeps data buffered and a gone client's send returns at once, so this
                    # loop might never suspend: give the loop a turn to see the disconnect.
                    await asyncio.sleep(0)
            await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            return ENDED_TIMEOUT
        except OSError:
            return ENDED_DISCONNECTED
        return ENDED_COMPLETED

    async def _watch(self, receive: Any) -> None:
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                self._gone = True
                return
