"""Schemas a request declares: tool ``parameters`` and ``response_format`` JSON schemas.

They are untrusted input: compiled through the app's :class:`~rules.schemas.SchemaCache` (each distinct
schema once, failures included) into the :class:`~rules.evaluate_response.ResponseContext` the response
decision uses. Everything here happens before anything is reserved or sent upstream:

- more than ``server.max_tools`` tools: ``400 too_many_tools``;
- a schema over ``server.max_schema_bytes`` / ``server.max_schema_depth`` (or with more patterns, or a
  larger ``$ref`` expansion, than :mod:`rules.schemas` allows): ``400 schema_too_complex``, not compiled;
- an invalid schema (a pattern the linear-time engine refuses, too): ``400 invalid_request``;
- compiling the request's new schemas costs more than :data:`server.schema_compile_budget_ms` of CPU: ``400
  schema_too_complex``.

jsonschema_rs holds the GIL while it compiles, so a worker thread would not free the event loop; instead
each compile is bounded by the caps, and the loop gets a turn between compiles.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from proxy.errors import ProxyError
from rules.evaluate import printable_name
from rules.evaluate_response import ResponseContext
from rules.schemas import CompiledSchema, SchemaDefinitionError, SchemaLimits, SchemaTooComplex

if TYPE_CHECKING:
    from proxy.reqctx import RequestContext
    from proxy.state import AppState
    from rules.effective import Effective

# server.schema_compile_budget_ms (default 50) is the CPU a request may spend measuring and compiling the
# schemas it declares. Cache hits cost microseconds and 512 new typical tool schemas (~0.5 KB each) ~25 ms,
# so it only bites a request full of new, costly schemas (one at the caps takes up to ~12 ms). It bounds
# what one request can cost the event loop: 10 such requests a second use half a core.
_SLICE_S = 0.001  # hand the event loop a turn once this much compiling has been done since the last one


def check_offered_tools(body: dict[str, Any], max_tools: int) -> None:
    """Refuse (``400 too_many_tools``) a request offering more than ``max_tools`` tools, before any work."""
    count = sum(len(v) for k in ("tools", "functions") if isinstance(v := body.get(k), list))
    if count > max_tools:
        raise ProxyError("too_many_tools", f"the request offers {count} tools; at most {max_tools} are allowed",
                         param="tools")


class _Compiler:
    """One request's declared schemas: the configured caps, the CPU budget, and turns for the event loop."""

    def __init__(self, state: AppState) -> None:
        srv = state.config.server
        self.cache = state.schema_cache
        self.lane = state.schema_lane
        self.budget_s = srv.schema_compile_budget_ms / 1000
        self.limits = SchemaLimits(max_bytes=srv.max_schema_bytes, max_depth=srv.max_schema_depth)
        self.spent = 0.0
        self.unyielded = 0.0

    async def compile(self, schema: dict[str, Any], what: str, param: str) -> CompiledSchema:
        # One compile at a time across requests (cache hits take microseconds): however many hostile
        # requests are compiling, the loop is never held longer than one compile between two turns.
        await self.lane.acquire()
        start = time.thread_time()  # this thread's CPU: the compile does not await, other work is not counted
        try:
            compiled = self.cache.get(schema, self.limits)
        except SchemaTooComplex as exc:
            raise ProxyError("schema_too_complex", f"{what} declares a schema over the limits: {exc}",
                             param=param) from None
        except SchemaDefinitionError as exc:
            raise ProxyError("invalid_request", f"{what} declares an invalid JSON schema: {exc}",
                             param=param) from None
        finally:
            spent = time.thread_time() - start
            self.lane.release()
            self.spent += spent
            self.unyielded += spent
        if self.spent > self.budget_s:
            raise ProxyError("schema_too_complex",
                             f"compiling the request's new schemas took more than the budget of "
                             f"{self.budget_s * 1000:.0f} ms of CPU (the ones compiled are cached: sent again, "
                             f"they cost nothing)", param=param)
        if self.unyielded > _SLICE_S:
            self.unyielded = 0.0
            await asyncio.sleep(0)  # let /healthz and other requests run between two compiles
        return compiled


async def _declare(compiler: _Compiler, eff: Effective, declared: dict[str, Any], fn: dict[str, Any],
                   param: str) -> None:
    """Compile (cached by content) the schema a request declares for a tool the policy pins none for."""
    name, params = fn.get("name"), fn.get("parameters")
    if not isinstance(name, str) or not isinstance(params, dict):
        return
    if any(not s.shadow for s in eff.tool_schemas.get(name, ())):
        return  # an enforced pinned schema always wins over what the request declares
    declared[name] = await compiler.compile(params, f"tool {printable_name(name)!r}", param)


async def response_context(state: AppState, eff: Effective, ctx: RequestContext,
                           body: dict[str, Any]) -> ResponseContext:
    """The response side's view of the request: declared tool schemas and the ``response_format`` schema."""
    compiler = _Compiler(state)
    declared: dict[str, Any] = {}
    for t in body.get("tools") or ():
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict):
            await _declare(compiler, eff, declared, fn, "tools")
    for f in body.get("functions") or ():
        if isinstance(f, dict):
            await _declare(compiler, eff, declared, f, "functions")
    response_schema = None
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "json_schema":
        js = rf.get("json_schema")
        if isinstance(js, dict) and isinstance(js.get("schema"), dict):
            response_schema = await compiler.compile(js["schema"], "response_format", "response_format")
    cfg = state.config.server
    return ResponseContext(ctx.principal, str(body.get("model")), declared, response_schema,
                           max_depth=cfg.json_max_depth, max_string=cfg.json_max_string)
