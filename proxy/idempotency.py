"""``Idempotency-Key``: the first completed response is stored and replayed for 24 h.

A retry with the same key and body gets the stored response (status, headers,
body; for streams the whole event sequence) with ``Idempotent-Replayed: true``
and makes no upstream call, charging nothing. Same key, different body: 422
``idempotency_key_reused``; while the first is in flight: 409
``idempotency_in_flight``. Keys are scoped to the caller's principal.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from proxy.errors import ProxyError
from proxy.reqctx import RequestContext
from proxy.stores import Store, StoreUnavailable

HEADER = "idempotency-key"
MAX_KEY = 255
_SKIP_HEADERS = {"content-length", "date", "server", "transfer-encoding", "connection"}


class IdemHandle:
    """One request's claim on a key (a no-op when the request sent none)."""

    def __init__(self, store: Store | None, key: str | None, body_hash: str, ttl_s: int) -> None:
        self.store, self.key, self.body_hash, self.ttl_s = store, key, body_hash, ttl_s
        self.replay: Response | None = None
        self.done = False

    async def complete(self, resp: Response) -> None:
        if self.store is None or self.key is None or self.done:
            return
        headers = {k: v for k, v in resp.headers.items() if k not in _SKIP_HEADERS}
        record = orjson.dumps({"status": resp.status_code, "headers": headers, "stream": False,
                               "body": bytes(resp.body).decode("utf-8", "replace")})
        await self._save(record)

    async def complete_stream(self, status: int, headers: dict[str, str], events: list[bytes]) -> None:
        if self.store is None or self.key is None or self.done:
            return
        record = orjson.dumps({"status": status, "headers": headers, "stream": True,
                               "events": [e.decode("utf-8", "replace") for e in events]})
        await self._save(record)

    async def _save(self, record: bytes) -> None:
        assert self.store is not None and self.key is not None
        self.done = True
        # If the store is down the in-flight marker expires; a retry then runs again rather than hanging.
        with contextlib.suppress(StoreUnavailable):
            await self.store.idem_complete(self.key, self.body_hash, record, ttl_s=self.ttl_s)

    async def abort(self) -> None:
        if self.store is None or self.key is None or self.done:
            return
        self.done = True
        with contextlib.suppress(StoreUnavailable):
            await self.store.idem_abort(self.key)


def _replay(record: bytes) -> Response:
    doc = orjson.loads(record)
    headers = dict(doc["headers"])
    headers["idempotent-replayed"] = "true"
    if doc.get("stream"):
        events = [e.encode() for e in doc["events"]]

        async def gen() -> AsyncIterator[bytes]:
            for e in events:
                yield e

        headers.pop("content-type", None)
        return StreamingResponse(gen(), status_code=doc["status"], headers=headers, media_type="text/event-stream")
    return Response(doc["body"].encode(), status_code=doc["status"], headers=headers)


class Idempotency:
    def __init__(self, store: Store, ttl_s: int, lock_s: int = 300) -> None:
        self.store, self.ttl_s, self.lock_s = store, ttl_s, lock_s

    async def begin(self, request: Request, raw: bytes, ctx: RequestContext, *, fail_open: bool) -> IdemHandle:
        key = request.headers.get(HEADER)
        if key is None:
            return IdemHandle(None, None, "", 0)
        if not key.strip():
            raise ProxyError("idempotency_key_empty", "Idempotency-Key is empty; send 1 to "
                             f"{MAX_KEY} characters, or no header", param="Idempotency-Key")
        if len(key) > MAX_KEY:
            raise ProxyError("idempotency_key_too_long", f"Idempotency-Key must be 1 to {MAX_KEY} characters",
                             param="Idempotency-Key")
        # length-prefixed: key ids may contain ":", and no (key id, key) pair may alias another
        scoped = f"{len(ctx.principal.key_id)}:{ctx.principal.key_id}:{key}"
        body_hash = hashlib.sha256(raw).hexdigest()
        try:
            got = await self.store.idem_begin(scoped, body_hash, ttl_s=self.ttl_s, lock_s=self.lock_s)
        except StoreUnavailable:
            if fail_open:
                ctx.degraded = True
                return IdemHandle(None, None, "", 0)
            raise ProxyError("state_unavailable", "idempotency store unavailable; failing closed") from None
        if got.state == "in_flight":
            raise ProxyError("idempotency_in_flight", "a request with this Idempotency-Key is still in progress")
        if got.state == "mismatch":
            raise ProxyError("idempotency_key_reused",
                             "this Idempotency-Key was used with a different request body")
        handle = IdemHandle(self.store, scoped, body_hash, self.ttl_s)
        if got.state == "replay" and got.record is not None:
            handle.done = True
            handle.replay = _replay(got.record)
            ctx.replayed = True
        return handle
