"""The app's state, built once at start-up and owned by the app (no globals)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import Response

from proxy.auth import KeyRing
from proxy.config import Config
from proxy.costing import CostGovernor
from proxy.errors import ProxyError
from proxy.idempotency import Idempotency
from proxy.policy_source import PolicyHolder
from proxy.reqctx import RequestContext
from proxy.responses import error_response
from proxy.stores import Store
from proxy.telemetry import Telemetry
from proxy.upstream import Upstreams, UpstreamTarget
from rules.schemas import SchemaCache


@dataclass
class AppState:
    config: Config
    keys: KeyRing
    policies: PolicyHolder
    upstreams: Upstreams
    targets: dict[str, UpstreamTarget]
    store: Store
    cost: CostGovernor
    idempotency: Idempotency
    schema_cache: SchemaCache
    telemetry: Telemetry
    background: list[Any] = field(default_factory=list)
    mock_server: Any = None

    def error_response(self, err: ProxyError, ctx: RequestContext | None, *, route: str | None = None) -> Response:
        """The one error envelope, with the decision headers when a request context exists."""
        if ctx is None and route is not None:
            self.telemetry.metrics.observe_request(route, None, err.status, 0.0)
        return error_response(err, ctx.decision_id if ctx else None, ctx.headers() if ctx else None)

    async def call_upstream(self, ctx: RequestContext, target: UpstreamTarget, body: dict[str, Any],
                            raw: bytes | None) -> dict[str, Any]:
        """One non-streaming upstream attempt, traced and timed."""
        ctx.upstream_attempts += 1
        headers: dict[str, str] = {}
        span = self.telemetry.upstream_span(ctx, target.model, headers)
        t0 = time.perf_counter()
        try:
            data = await self.upstreams.complete(target, body, raw, headers)
        except ProxyError as err:
            self.telemetry.upstream_done(span, error=err)
            raise
        self.telemetry.metrics.observe_upstream(target.route.name, time.perf_counter() - t0)
        if span is not None:
            usage = data.get("usage") or {}
            span.set_attributes({"gen_ai.response.model": str(data.get("model", "")),
                                 "gen_ai.usage.input_tokens": int(usage.get("prompt_tokens") or 0),
                                 "gen_ai.usage.output_tokens": int(usage.get("completion_tokens") or 0)})
            span.end()
        return data
