"""The floor of guardproxy's stack: the smallest Starlette + aiohttp forwarder, on uvicorn + uvloop + httptools.

No auth, policy, cost or telemetry: it reads the body, POSTs it to the upstream on a pooled aiohttp
session and returns the answer. What it costs per request is what any proxy built on this server and
client stack pays before doing anything. Usage: ``python bench/floor_forwarder.py PORT UPSTREAM_CHAT_URL``
(``bench/run.py --floor`` starts it as a contender).
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def build(upstream: str) -> Starlette:
    session: list[aiohttp.ClientSession] = []

    async def chat(request: Request) -> Response:
        body = await request.body()
        headers = {"content-type": "application/json", "user-agent": "floor"}
        async with session[0].post(upstream, data=body, headers=headers) as resp:
            data = await resp.read()
            status = resp.status
        return Response(data, status_code=status, media_type="application/json")

    async def health(_: Request) -> Response:
        return Response(b'{"ok":true}', media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        session.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)))
        yield
        await session[0].close()

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/healthz", health)],
                     lifespan=lifespan)


def main() -> None:
    app = build(sys.argv[2])
    gc.freeze()
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools",
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
