"""Schemas a request declares: tool ``parameters`` and ``response_format`` JSON schemas.

They are untrusted input: compiled through the app's :class:`~rules.schemas.SchemaCache` (each distinct
schema once) into the :class:`~rules.evaluate_response.ResponseContext` the response decision uses. An
invalid schema is a ``400`` before anything is reserved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy.errors import ProxyError
from rules.evaluate_response import ResponseContext
from rules.schemas import SchemaDefinitionError

if TYPE_CHECKING:
    from proxy.reqctx import RequestContext
    from proxy.state import AppState
    from rules.effective import Effective


def check_offered_tools(body: dict[str, Any], max_tools: int) -> None:
    """Refuse (``400 too_many_tools``) a request offering more than ``max_tools`` tools, before any work."""
    count = sum(len(v) for k in ("tools", "functions") if isinstance(v := body.get(k), list))
    if count > max_tools:
        raise ProxyError("too_many_tools", f"the request offers {count} tools; at most {max_tools} are allowed",
                         param="tools")


def _declare(state: AppState, eff: Effective, declared: dict[str, Any], fn: dict[str, Any]) -> None:
    """Compile (cached by content) the schema a request declares for a tool the policy pins none for."""
    name, params = fn.get("name"), fn.get("parameters")
    if not isinstance(name, str) or not isinstance(params, dict):
        return
    if any(not s.shadow for s in eff.tool_schemas.get(name, ())):
        return  # an enforced pinned schema always wins over what the request declares
    try:
        declared[name] = state.schema_cache.get(params)
    except SchemaDefinitionError as exc:
        raise ProxyError("invalid_request", f"tool {name!r} declares an invalid JSON schema: {exc}",
                         param="tools") from None


async def response_context(state: AppState, eff: Effective, ctx: RequestContext,
                           body: dict[str, Any]) -> ResponseContext:
    """The response side's view of the request: declared tool schemas and the ``response_format`` schema."""
    declared: dict[str, Any] = {}
    for t in body.get("tools") or ():
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict):
            _declare(state, eff, declared, fn)
    for f in body.get("functions") or ():
        if isinstance(f, dict):
            _declare(state, eff, declared, f)
    response_schema = None
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "json_schema":
        js = rf.get("json_schema")
        if isinstance(js, dict) and isinstance(js.get("schema"), dict):
            try:
                response_schema = state.schema_cache.get(js["schema"])
            except SchemaDefinitionError as exc:
                raise ProxyError("invalid_request", f"response_format declares an invalid JSON schema: {exc}",
                                 param="response_format") from None
    cfg = state.config.server
    return ResponseContext(ctx.principal, str(body.get("model")), declared, response_schema,
                           max_depth=cfg.json_max_depth, max_string=cfg.json_max_string)
