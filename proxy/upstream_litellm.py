"""Non-OpenAI providers (Anthropic, Bedrock, Vertex, ...) through ``litellm`` as a library.

Imported lazily: ``import litellm`` takes seconds, so only routes that need it
pay for it, on first use. ``LITELLM_LOCAL_MODEL_COST_MAP=True`` keeps the import
offline. Never ``litellm.proxy``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from proxy.errors import ProxyError

if TYPE_CHECKING:
    from proxy.upstream import UpstreamTarget

_PASSTHROUGH = {"model", "messages"}


def _litellm() -> Any:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import litellm

    return litellm


def _kwargs(target: UpstreamTarget, body: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: v for k, v in body.items() if k not in _PASSTHROUGH}
    kwargs["model"] = target.route.upstream
    kwargs["messages"] = body.get("messages", [])
    if target.route.api_key is not None and target.route.api_key.get_secret_value():
        kwargs["api_key"] = target.route.api_key.get_secret_value()
    if target.route.api_base:
        kwargs["api_base"] = target.route.api_base
    kwargs["timeout"] = target.timeout.total
    return kwargs


def _map_error(exc: Exception) -> ProxyError:
    status = getattr(exc, "status_code", None)
    if type(exc).__name__ == "Timeout":
        return ProxyError("upstream_timeout", "upstream did not answer in time")
    return ProxyError("upstream_error", f"upstream returned HTTP {status}" if status else "upstream failed")


async def litellm_complete(target: UpstreamTarget, body: dict[str, Any]) -> dict[str, Any]:
    litellm = _litellm()
    try:
        resp = await litellm.acompletion(**{**_kwargs(target, body), "stream": False})
    except Exception as exc:  # litellm raises its own exception tree per provider
        raise _map_error(exc) from None
    out: dict[str, Any] = resp.model_dump(exclude_none=True)
    return out


async def litellm_stream(target: UpstreamTarget, body: dict[str, Any]) -> AsyncIterator[bytes]:
    litellm = _litellm()
    try:
        stream = await litellm.acompletion(**{**_kwargs(target, body), "stream": True})
        async for chunk in stream:
            yield orjson.dumps(chunk.model_dump(exclude_none=True))
    except Exception as exc:
        raise _map_error(exc) from None
    yield b"[DONE]"
