"""The app's state, built once at start-up and owned by the app (no globals)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import Response

from proxy.auth import KeyRing
from proxy.config import Config
from proxy.costing import CostGovernor
from proxy.decisions import DecisionIds
from proxy.errors import ProxyError
from proxy.idempotency import Idempotency
from proxy.policy_source import PolicyHolder
from proxy.reqctx import RequestContext
from proxy.respond import Outcome, resolve_calls
from proxy.responses import error_response
from proxy.stores import Store
from proxy.telemetry import Telemetry
from proxy.upstream import Upstreams, UpstreamTarget
from rules.decision import CallVerdict
from rules.effective import Effective
from rules.schemas import SchemaCache


@dataclass
class AppState:
    config: Config
    keys: KeyRing
    policies: PolicyHolder
    decision_ids: DecisionIds
    upstreams: Upstreams
    targets: dict[str, UpstreamTarget]
    store: Store
    cost: CostGovernor
    idempotency: Idempotency
    schema_cache: SchemaCache
    telemetry: Telemetry
    background: list[Any] = field(default_factory=list)
    schema_lane: asyncio.Lock = field(default_factory=asyncio.Lock)  # one declared-schema compile at a time
    mock_server: Any = None

    @staticmethod
    def error_response(err: ProxyError, ctx: RequestContext) -> Response:
        """The one error envelope, with the request's decision headers."""
        return error_response(err, ctx.decision_id, ctx.headers())

    async def resolve_calls(self, ctx: RequestContext, eff: Effective,
                            verdicts: tuple[CallVerdict, ...]) -> Outcome:
        """The calls the agent gets for decided verdicts (approvals and once-markers consulted), each
        outcome counted in the tool-call metric."""
        first = len(ctx.tool_outcomes)  # an escalation held for approval records two outcomes for one call
        outcome = await resolve_calls(self.store, ctx, verdicts, approval_ttl_s=self.config.approval_ttl_s,
                                      fail_open=eff.fail_open)
        for name, result, _rule, _reason in ctx.tool_outcomes[first:]:
            self.telemetry.metrics.tool_call(name, result)
        return outcome

    def take_usage(self, ctx: RequestContext, usage: dict[str, Any] | None,
                   prompt_tokens: int) -> dict[str, Any] | None:
        """Add one upstream attempt's (validated) usage to ``ctx``, capped at what the attempt can have used
        (``usage_capped`` when it was); returns the usage as counted."""
        if usage and ctx.plan is not None:
            usage, capped = self.cost.bound_usage(ctx.plan, usage, prompt_tokens)
            if capped and "usage_capped" not in ctx.actions:
                ctx.actions.append("usage_capped")
        ctx.add_usage(usage)
        return usage

    async def call_upstream(self, ctx: RequestContext, target: UpstreamTarget, body: dict[str, Any],
                            raw: bytes | None, *, prompt_tokens: int) -> dict[str, Any]:
        """One non-streaming upstream attempt, traced and timed. The answer's shape is checked (a body the
        proxy cannot read is ``502 upstream_error``) and its usage, capped at what this attempt can have
        used (``prompt_tokens`` is the proxy's count of this attempt's prompt), is added to ``ctx``."""
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
        usage = self.take_usage(ctx, data.get("usage"), prompt_tokens)
        if span is not None:
            span.set_attribute("gen_ai.response.model", str(data.get("model", "")))
        self.telemetry.upstream_done(span, usage=usage)
        return data
