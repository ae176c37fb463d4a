"""Upstream clients: a pooled aiohttp fast path for OpenAI-compatible APIs, litellm for the rest.

One ``aiohttp.ClientSession`` per app (connection pooling, keep-alive) serves
every OpenAI-compatible route (OpenAI, Azure OpenAI, vLLM, Ollama, any ``/v1``
server). Other providers go through ``litellm.acompletion`` as a library,
imported lazily (importing litellm costs seconds) and only when such a route is
configured. Upstream errors become 502/504 with the upstream status in the
message; upstream keys come from config only, never from the caller.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from proxy import upstream_shape as shape
from proxy.config import ModelRoute
from proxy.errors import ProxyError

OPENAI_COMPATIBLE = {"openai", "azure", "vllm", "ollama", "hosted_vllm", "openai_compatible", "mock"}


@dataclass(frozen=True)
class UpstreamTarget:
    """Where a route's requests go (resolved once at start-up)."""

    route: ModelRoute
    url: str | None  # None: the litellm path
    headers: dict[str, str]
    model: str
    timeout: aiohttp.ClientTimeout


def build_target(route: ModelRoute, *, api_base: str | None, timeout_s: float, connect_s: float) -> UpstreamTarget:
    """Resolve a route to its URL and headers (``api_base`` may be the built-in mock's)."""
    timeout = aiohttp.ClientTimeout(total=route.timeout_s or timeout_s, sock_connect=connect_s)
    if route.provider not in OPENAI_COMPATIBLE:
        return UpstreamTarget(route, None, {}, route.upstream, timeout)
    base = (api_base or route.api_base or "https://api.openai.com/v1").rstrip("/")
    # An explicit user-agent rather than skip_auto_headers: any skip list sends every aiohttp request
    # down a slow header-merging path (~5% of the proxy's CPU under load).
    headers = {"content-type": "application/json", "user-agent": "guardproxy"}
    key = route.api_key.get_secret_value() if route.api_key is not None else ""
    if key:
        if route.provider == "azure":
            headers["api-key"] = key
        else:
            headers["authorization"] = f"Bearer {key}"
    return UpstreamTarget(route, f"{base}/chat/completions", headers, route.upstream_model, timeout)


def upstream_failure(status: int | None, detail: str = "") -> ProxyError:
    if status is None:
        return ProxyError("upstream_error", f"upstream unreachable{': ' + detail if detail else ''}")
    return ProxyError("upstream_error", f"upstream returned HTTP {status}{': ' + detail if detail else ''}")


def _upstream_message(raw: bytes, target: UpstreamTarget) -> str:
    try:
        err = orjson.loads(raw).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        text = str(msg) if msg else ""
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    # Providers echo the key they were sent ("Incorrect API key provided: sk-..."): never pass it on.
    key = target.route.api_key.get_secret_value() if target.route.api_key is not None else ""
    if key:
        text = text.replace(key, "[redacted]")
    return text[:300]


class Upstreams:
    """Owns the pooled HTTP session; sends chat requests to a target."""

    def __init__(self, pool_size: int, *, max_depth: int = 64) -> None:
        self._pool_size = pool_size
        self._max_depth = max_depth
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._pool_size, limit_per_host=self._pool_size,
                                         ttl_dns_cache=300, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, json_serialize=lambda o: orjson.dumps(o).decode(),
                                              auto_decompress=True)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @staticmethod
    def _prepare(target: UpstreamTarget, body: dict[str, Any], raw: bytes | None) -> bytes:
        if raw is not None and body.get("model") == target.model:
            return raw
        if body.get("model") != target.model:
            body = {**body, "model": target.model}
        return orjson.dumps(body)

    async def complete(self, target: UpstreamTarget, body: dict[str, Any], raw: bytes | None,
                       extra_headers: dict[str, str]) -> dict[str, Any]:
        """A non-streaming call; returns the parsed response JSON."""
        if target.url is None:
            from proxy.upstream_litellm import litellm_complete

            return shape.completion(await litellm_complete(target, body))
        assert self._session is not None
        data = self._prepare(target, body, raw)
        try:
            async with self._session.post(target.url, data=data, headers={**target.headers, **extra_headers},
                                          timeout=target.timeout) as resp:
                payload = await resp.read()
                if resp.status >= 400:
                    raise upstream_failure(resp.status, _upstream_message(payload, target))
        except TimeoutError:
            raise ProxyError("upstream_timeout", "upstream did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise upstream_failure(None, type(exc).__name__) from None
        return shape.completion(shape.parse(payload, max_depth=self._max_depth))

    async def stream(self, target: UpstreamTarget, body: dict[str, Any], raw: bytes | None,
                     extra_headers: dict[str, str]) -> AsyncIterator[bytes]:
        """A streaming call: yields each SSE ``data:`` payload (without the prefix), ``b"[DONE]"`` last.

        Errors before the first byte raise :class:`ProxyError`; errors midway raise it from the iterator.
        """
        if target.url is None:
            from proxy.upstream_litellm import litellm_stream

            return litellm_stream(target, body)
        assert self._session is not None
        data = self._prepare(target, body, raw)
        ctx = self._session.post(target.url, data=data, headers={**target.headers, **extra_headers},
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=target.timeout.sock_connect,
                                                               sock_read=target.timeout.total))
        try:
            resp = await ctx.__aenter__()
        except TimeoutError:
            raise ProxyError("upstream_timeout", "upstream did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise upstream_failure(None, type(exc).__name__) from None
        if resp.status >= 400:
            payload = await resp.read()
            resp.release()
            raise upstream_failure(resp.status, _upstream_message(payload, target))
        return _sse_events(resp)


async def _sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        done = False
        async for line in resp.content:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                yield payload
                break
            if payload:
                yield payload
        if not done:
            raise ProxyError("upstream_error", "upstream stream ended before [DONE]")
    except TimeoutError:
        raise ProxyError("upstream_timeout", "upstream stream stalled") from None
    except aiohttp.ClientError as exc:
        raise upstream_failure(None, f"stream broken ({type(exc).__name__})") from None
    finally:
        resp.release()
