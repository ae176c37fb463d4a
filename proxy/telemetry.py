"""Glue between the request path and ``otel/``: one request record -> span, metrics, audit line.

The server span is named ``chat {model}`` and follows the GenAI semantic
conventions; policy evaluations are child spans, each upstream attempt
(repairs included) a CLIENT child span, and every tool-call decision a span
event. Secrets never reach any of these: only ids, names, counts and costs.
Message content is attached only with ``telemetry.capture_content: true``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanKind, Status, StatusCode

from otel import semconv as sc
from otel.audit import AuditLog
from otel.metrics import Metrics
from otel.tracing import Tracing, mark_error, span_ids
from proxy.errors import ProxyError
from proxy.reqctx import RequestContext
from rules.cost import micro_to_usd_str
from rules.decision import Decision
from rules.effective import DEFAULT_ORG

if TYPE_CHECKING:
    from rules.compiler import CompiledPolicySet

log = logging.getLogger("guardproxy")

# litellm-style provider prefix -> ``gen_ai.provider.name`` well-known value (semconv GenAI registry).
GENAI_PROVIDERS: dict[str, str] = {
    "openai": "openai", "azure": "azure.ai.openai", "anthropic": "anthropic", "bedrock": "aws.bedrock",
    "vertex_ai": "gcp.vertex_ai", "gemini": "gcp.gemini", "mistral": "mistral_ai", "groq": "groq",
    "cohere": "cohere", "deepseek": "deepseek", "xai": "x_ai", "perplexity": "perplexity",
    "watsonx": "ibm.watsonx.ai",
}


def team_label(org: str, team: str | None) -> str:
    """A team's metric label: teams are ``(org, team)``; the default org's teams keep their bare name."""
    if team is None:
        return ""
    return team if org == DEFAULT_ORG else f"{org}/{team}"


def genai_provider(provider: str) -> str:
    """The semconv provider name for a route's provider prefix (unknown prefixes pass through)."""
    return GENAI_PROVIDERS.get(provider, provider)


class Telemetry:
    """One per app: turns each finished :class:`RequestContext` into spans, metrics and an audit line.

    ``providers`` maps a client-facing model name to its route's provider prefix (``openai``,
    ``azure``...), for ``gen_ai.provider.name``; unknown names count as ``openai``.
    """

    def __init__(self, tracing: Tracing, metrics: Metrics, audit: AuditLog | None,
                 providers: Mapping[str, str] | None = None) -> None:
        self.tracing = tracing
        self.metrics = metrics
        self.audit = audit
        self.providers = dict(providers or {})

    def _provider(self, model: str) -> str:
        return genai_provider(self.providers.get(model, "openai"))

    def policies_loaded(self, result: str, revision: str, compiled: CompiledPolicySet | None) -> None:
        """A (re)load finished: count it and make the policies' tool names and rule ids the metric
        label vocabulary (anything else, e.g. a tool name a caller made up, is counted as ``other``)."""
        self.metrics.reload(result, revision)
        if result == "ok" and compiled is not None:
            self.metrics.tools, self.metrics.rules = label_vocabulary(compiled)

    # -- spans ---------------------------------------------------------------
    def begin(self, ctx: RequestContext, headers: Mapping[str, str] | None) -> None:
        """Start the server span once the model and conversation are known (it starts when the request
        did). A request refused earlier gets its span from :meth:`finish`."""
        if not self.tracing.enabled:
            return
        parent = self.tracing.extract_context(headers) if headers is not None else None
        name = f"chat {ctx.model_asked}" if ctx.model_asked else "chat"
        attrs = {sc.GEN_AI_OPERATION_NAME: "chat", sc.GUARDPROXY_DECISION_ID: ctx.decision_id,
                 "http.request.method": "POST", "http.route": ctx.route}
        if ctx.model_asked:
            attrs[sc.GEN_AI_REQUEST_MODEL] = ctx.model_asked
        ctx.span = self.tracing.start_server_span(name, parent, attrs, conversation_id=ctx.conversation or None,
                                                  start_time=ctx.started_ns)

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
        """A CLIENT span for one upstream attempt (repairs make more), its context written into
        ``headers`` as ``traceparent``. None when tracing is off; the caller ends it."""
        if ctx.span is None:
            return None
        span = self.tracing.start_child(f"chat {model}", parent=ctx.span, kind=SpanKind.CLIENT, attributes={
            sc.GEN_AI_OPERATION_NAME: "chat", sc.GEN_AI_REQUEST_MODEL: model,
            sc.GEN_AI_PROVIDER_NAME: self._provider(ctx.model_used),
            "guardproxy.upstream.attempt": ctx.upstream_attempts})
        self.tracing.inject(headers, span)
        return span

    @staticmethod
    def upstream_done(span: Any, *, usage: Mapping[str, Any] | None = None,
                      error: BaseException | None = None) -> None:
        """End an upstream attempt's span (idempotent: an ended span is left alone), with the usage the
        upstream reported, or marked failed with the error code only (messages may quote the upstream)."""
        if span is None or not span.is_recording():
            return
        if usage:
            span.set_attributes({sc.GEN_AI_USAGE_INPUT_TOKENS: int(usage.get("prompt_tokens") or 0),
                                 sc.GEN_AI_USAGE_OUTPUT_TOKENS: int(usage.get("completion_tokens") or 0)})
        if error is not None:
            mark_error(span, error.code if isinstance(error, ProxyError) else type(error).__name__)
        span.end()

    # -- opt-in content capture (telemetry.capture_content) -----------------------
    def record_input(self, ctx: RequestContext, messages: Any) -> None:
        """The request messages on the server span, only with ``capture_content: true``."""
        if ctx.span is not None and self.tracing.capture_content:
            self.tracing.record_content(ctx.span, sc.GEN_AI_INPUT_MESSAGES, messages)

    def record_output(self, ctx: RequestContext, messages: Any) -> None:
        """The answer as delivered to the caller (after policy), only with ``capture_content: true``."""
        if ctx.span is not None and self.tracing.capture_content:
            self.tracing.record_content(ctx.span, sc.GEN_AI_OUTPUT_MESSAGES, messages)

    # -- the end of a request --------------------------------------------------
    def finish(self, ctx: RequestContext, error: ProxyError | None = None) -> None:
        """Record the request once it is decided: metrics, the server span's outcome, the audit line."""
        seconds = time.perf_counter() - ctx.started
        status = error.status if error is not None else ctx.status
        m = self.metrics
        m.observe_request(ctx.route, ctx.model_asked or None, status, seconds,
                          code=error.code if error is not None else ctx.error_code)
        if ctx.span is None:
            self.begin(ctx, None)  # refused before the model was known (401, bad JSON): still one span
        plan = ctx.plan
        p = ctx.principal
        if plan is not None and plan.settled:
            m.add_usage(team_label(p.org, p.team), p.key_id, ctx.model_used, int(ctx.usage.get("prompt_tokens", 0)),
                        int(ctx.usage.get("completion_tokens", 0)), plan.actual)
        for action in ctx.actions:
            kind = action.split(":", 1)[0]
            m.decision(kind, _rule_for(ctx, action), False)
            if kind == "approval_requested":
                m.approval("requested")
        for would in ctx.would:
            m.decision(would.split(":", 1)[0], _rule_for(ctx, would), True)
        if ctx.degraded or (plan is not None and plan.degraded):
            m.degraded()
        self._end_span(ctx, status, error)
        if self.audit is not None:
            try:
                self.audit.record(self._audit_event(ctx, status, error))
            except (OSError, ValueError):
                # The answer is already decided; a full disk must not turn it into a 500.
                m.store_error("audit")
                log.exception("audit log write failed for %s", ctx.decision_id)

    def _end_span(self, ctx: RequestContext, status: int, error: ProxyError | None) -> None:
        span = ctx.span
        if span is None:
            return
        plan = ctx.plan
        attrs: dict[str, Any] = {
            sc.GEN_AI_PROVIDER_NAME: self._provider(ctx.model_used), sc.GEN_AI_RESPONSE_MODEL: ctx.model_used,
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
            "span_id": ids[1] if ids else None,
            "principal": {"key": ctx.principal.key_id, "team": ctx.principal.team, "org": ctx.principal.org}
            if ctx.authenticated else None,
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


def _rule_for(ctx: RequestContext, action: str) -> str | None:
    """The rule behind ``action``: the tool outcome's rule for ``kind:tool`` actions, else the
    single matched rule when there is exactly one (several rules and no tool: unknown)."""
    _, _, target = action.partition(":")
    if target:
        for tool, _outcome, rule, _reason in ctx.tool_outcomes:
            if tool == target and rule:
                return rule
        suffix = f".{target}"
        for rule_id in ctx.rule_ids:
            if rule_id.endswith(suffix):  # e.g. clamped:temperature <- policy:models.params.temperature
                return rule_id
    return ctx.rule_ids[0] if len(ctx.rule_ids) == 1 else None


def label_vocabulary(compiled: CompiledPolicySet) -> tuple[frozenset[str], frozenset[str]]:
    """(tool names, rule ids) a policy set can put on a decision: the ids written in the policies
    plus the ones the evaluator derives from them (``{policy}:tools``, ``{policy}:models.params.x``)."""
    tools: set[str] = set()
    rules = {"once_per_conversation", "tools.invalid_name", "output:schema"}
    for cp in compiled.policies:
        pol, name = cp.policy, cp.name
        tools.update(pol.tools.allow)
        tools.update(t for t in pol.tools.deny if not any(ch in t for ch in "*?["))
        if pol.tools.escalate_to:
            tools.add(pol.tools.escalate_to)
        rules.update({f"{name}:tools", f"{name}:models.allow", f"{name}:schema"})
        rules.update(f"{name}:models.params.{param}" for param in pol.models.params)
        rules.update(f"{tool}:{what}" for tool in pol.tools.allow for what in ("schema", "arguments"))
        rules.update(r.id for spec in pol.tools.allow.values() for r in spec.rules)
        rules.update(r.id for r in pol.output.rules)
        rules.update(p.id for p in pol.output.deny_patterns)
    return frozenset(tools), frozenset(rules)
