"""Glue between the request path and ``otel/``: one request record -> span, metrics, audit line.

The server span is named ``chat {model}`` and follows the GenAI semantic
conventions; policy evaluations are child spans, each upstream attempt
(repairs included) a CLIENT child span, and every tool-call decision a span
event. Secrets never reach any of these: only ids, names, counts and costs.
Message content is attached only with ``telemetry.capture_content: true``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode

from otel import semconv as sc
from otel.audit import AuditLog
from otel.metrics import Metrics
from otel.tracing import Tracing, span_ids
from proxy.errors import ProxyError
from proxy.reqctx import RequestContext
from rules.cost import micro_to_usd_str
from rules.decision import Decision


class Telemetry:
    def __init__(self, tracing: Tracing, metrics: Metrics, audit: AuditLog | None) -> None:
        self.tracing = tracing
        self.metrics = metrics
        self.audit = audit

    # -- spans ---------------------------------------------------------------
    def begin(self, ctx: RequestContext, headers: Mapping[str, str]) -> None:
        """Start the server span once the model and conversation are known."""
        if not self.tracing.enabled:
            return
        parent = self.tracing.extract_context(headers)
        ctx.span = self.tracing.start_server_span(
            f"chat {ctx.model_asked}", parent,
            {sc.GEN_AI_OPERATION_NAME: "chat", sc.GEN_AI_REQUEST_MODEL: ctx.model_asked,
             sc.GUARDPROXY_DECISION_ID: ctx.decision_id},
            conversation_id=ctx.conversation or None)

    def _decision_span(self, ctx: RequestContext, name: str, d: Decision) -> None:
        if ctx.span is None:
            return
        span = self.tracing.start_child(name, parent=ctx.span, attributes={
            sc.GUARDPROXY_DECISION_ID: ctx.decision_id, sc.GUARDPROXY_POLICY_REVISION: d.revision,
            sc.GUARDPROXY_RULE_IDS: list(d.rule_ids), sc.GUARDPROXY_ACTIONS: list(d.actions),
            sc.GUARDPROXY_SHADOW_WOULD: list(d.would), "guardproxy.decision.effect": d.effect})
        span.end()

    def request_decision(self, ctx: RequestContext, d: Decision) -> None:
        self._decision_span(ctx, "policy.request", d)

    def response_decision(self, ctx: RequestContext, d: Decision) -> None:
        self._decision_span(ctx, "policy.response", d)

    def upstream_span(self, ctx: RequestContext, model: str, headers: dict[str, str]) -> Any:
        if ctx.span is None:
            return None
        span = self.tracing.start_child(f"chat {model}", parent=ctx.span, kind=SpanKind.CLIENT, attributes={
            sc.GEN_AI_OPERATION_NAME: "chat", sc.GEN_AI_REQUEST_MODEL: model,
            "guardproxy.upstream.attempt": ctx.upstream_attempts})
        self.tracing.inject(headers, span)
        return span

    # -- the end of a request --------------------------------------------------
    def finish(self, ctx: RequestContext, error: ProxyError | None = None) -> None:
        seconds = time.perf_counter() - ctx.started
        status = error.status if error is not None else ctx.status
        m = self.metrics
        m.observe_request(ctx.route, ctx.model_asked or None, status, seconds)
        plan = ctx.plan
        p = ctx.principal
        if plan is not None and plan.settled:
            m.add_usage(p.team or "", p.key_id, ctx.model_used, int(ctx.usage.get("prompt_tokens", 0)),
                        int(ctx.usage.get("completion_tokens", 0)), plan.actual)
        for action in ctx.actions:
            kind = action.split(":", 1)[0]
            m.decision(kind, _rule_for(ctx), False)
            if kind == "approval_requested":
                m.approval("requested")
        for would in ctx.would:
            m.decision(would.split(":", 1)[0], _rule_for(ctx), True)
        if ctx.degraded or (plan is not None and plan.degraded):
            m.degraded()
        self._end_span(ctx, status, error)
        if self.audit is not None:
            self.audit.record(self._audit_event(ctx, status, error))

    def _end_span(self, ctx: RequestContext, status: int, error: ProxyError | None) -> None:
        span = ctx.span
        if span is None:
            return
        plan = ctx.plan
        attrs: dict[str, Any] = {
            sc.GEN_AI_PROVIDER_NAME: "openai", sc.GEN_AI_RESPONSE_MODEL: ctx.model_used,
            sc.GUARDPROXY_POLICY_REVISION: ctx.revision, sc.GUARDPROXY_RULE_IDS: ctx.rule_ids,
            sc.GUARDPROXY_ACTIONS: ctx.actions, sc.GUARDPROXY_SHADOW_WOULD: ctx.would,
            "http.response.status_code": status,
        }
        if ctx.usage:
            attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] = int(ctx.usage.get("prompt_tokens", 0))
            attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] = int(ctx.usage.get("completion_tokens", 0))
        if ctx.finish_reasons:
            attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] = ctx.finish_reasons
        if plan is not None:
            attrs[sc.GUARDPROXY_COST_ESTIMATED_USD] = float(micro_to_usd_str(plan.estimate))
            if plan.settled:
                attrs[sc.GUARDPROXY_COST_ACTUAL_USD] = float(micro_to_usd_str(plan.actual))
            if plan.downgraded_from:
                attrs[sc.GUARDPROXY_DOWNGRADED_FROM] = plan.downgraded_from
            if plan.compressed:
                attrs[sc.GUARDPROXY_COMPRESSED_TOKENS] = plan.compressed[0] - plan.compressed[1]
        if ctx.degraded or (plan is not None and plan.degraded):
            attrs[sc.GUARDPROXY_DEGRADED] = True
        span.set_attributes(attrs)
        for tool, outcome, rule, reason in ctx.tool_outcomes:
            span.add_event("guardproxy.tool_call", {"tool": tool, "outcome": outcome, "rule": rule or "",
                                                    "reason": reason})
        if error is not None:
            span.set_attribute("error.type", error.code)
            span.set_status(Status(StatusCode.ERROR, error.code))
        span.end()

    def _audit_event(self, ctx: RequestContext, status: int, error: ProxyError | None) -> dict[str, Any]:
        ids = span_ids(ctx.span) if ctx.span is not None else None
        plan = ctx.plan
        return {
            "decision_id": ctx.decision_id, "trace_id": ids[0] if ids else None,
            "span_id": ids[1] if ids else None, "principal": {"key": ctx.principal.key_id,
                                                               "team": ctx.principal.team,
                                                               "org": ctx.principal.org},
            "conversation": ctx.conversation or None, "policy_revision": ctx.revision or None,
            "rule_ids": ctx.rule_ids, "actions": ctx.actions, "would": ctx.would, "reasons": ctx.reasons,
            "errors": ctx.errors, "tool_calls": [{"tool": t, "outcome": o, "rule": r} for t, o, r, _ in
                                                 ctx.tool_outcomes],
            "model_requested": ctx.model_asked or None, "model_used": ctx.model_used or None,
            "estimated_cost_usd": micro_to_usd_str(plan.estimate) if plan else None,
            "actual_cost_usd": micro_to_usd_str(plan.actual) if plan and plan.settled else None,
            "status": status, "error_code": error.code if error else None, "stream": ctx.stream,
            "repairs": ctx.repairs, "approval_ids": ctx.approval_ids, "replayed": ctx.replayed,
            "degraded": ctx.degraded or bool(plan and plan.degraded),
        }


def _rule_for(ctx: RequestContext) -> str | None:
    return ctx.rule_ids[0] if ctx.rule_ids else None
