"""Per-request record: everything the pipeline learned, for headers, spans, metrics and the audit line.

One value feeds all four (the "one event per decision" rule), so they never
disagree about what happened.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from proxy.costing import CostPlan
from rules.cost import micro_to_usd_str
from rules.decision import Decision
from rules.evaluate import Principal

ANONYMOUS = Principal("-")  # the principal of a request refused before a key was recognised


def new_decision_id() -> str:
    """An unbound id (tests and refusals before authentication); served requests get
    :meth:`proxy.decisions.DecisionIds.issue` ids, which name their key."""
    return "dec_" + os.urandom(16).hex()


@dataclass
class RequestContext:
    principal: Principal
    route: str = "/v1/chat/completions"
    decision_id: str = field(default_factory=new_decision_id)
    started: float = field(default_factory=time.perf_counter)
    started_ns: int = field(default_factory=time.time_ns)
    authenticated: bool = True
    conversation: str = ""
    model_asked: str = ""
    model_used: str = ""
    revision: str = ""
    stream: bool = False
    actions: list[str] = field(default_factory=list)
    would: list[str] = field(default_factory=list)
    rule_ids: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tool_outcomes: list[tuple[str, str, str | None, str]] = field(default_factory=list)
    approval_ids: list[str] = field(default_factory=list)
    effects: list[Any] = field(default_factory=list)  # grants consumed (proxy.respond.Consumed), until delivered
    plan: CostPlan | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    finish_reasons: list[str] = field(default_factory=list)
    repairs: int = 0
    upstream_attempts: int = 0
    status: int = 200
    error_code: str | None = None
    degraded: bool = False
    replayed: bool = False
    span: Any = None

    def absorb(self, d: Decision) -> None:
        """Merge a decision's findings (request side, then each response pass)."""
        self.revision = d.revision
        self.actions.extend(d.actions)
        self.would.extend(d.would)
        for r in d.rule_ids:
            if r not in self.rule_ids:
                self.rule_ids.append(r)
        self.reasons.extend(d.reasons)
        self.errors.extend(d.errors)

    def add_usage(self, usage: dict[str, Any] | None) -> None:
        """Sum usage over attempts (repairs are real calls and count)."""
        if not usage:
            return
        for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
            v = usage.get(k)
            if isinstance(v, int):
                self.usage[k] = self.usage.get(k, 0) + v
        for detail, sub in (("prompt_tokens_details", "cached_tokens"),
                            ("completion_tokens_details", "reasoning_tokens")):
            d = usage.get(detail)
            if isinstance(d, dict) and isinstance(d.get(sub), int):
                cur = self.usage.setdefault(detail, {})
                cur[sub] = cur.get(sub, 0) + d[sub]

    def headers(self) -> dict[str, str]:
        h = {"x-guardproxy-decision-id": self.decision_id}
        if self.revision:
            h["x-guardproxy-policy-revision"] = self.revision
        acts = self.actions + self.would
        if acts:
            h["x-guardproxy-actions"] = ",".join(acts)[:4000]
        if self.model_used:
            h["x-guardproxy-model"] = self.model_used
        if self.conversation:
            h["x-guardproxy-conversation-id"] = self.conversation
        plan = self.plan
        if plan is not None:
            h["x-guardproxy-cost-usd"] = micro_to_usd_str(plan.actual if plan.settled else plan.estimate)
            if not plan.settled:
                h["x-guardproxy-cost-estimate"] = "true"
            if plan.conversation_spend is not None:
                h["x-guardproxy-conversation-spend-usd"] = micro_to_usd_str(plan.conversation_spend)
        if self.approval_ids:
            h["x-guardproxy-approval-id"] = ",".join(self.approval_ids)
        if self.degraded or (plan is not None and plan.degraded):
            h["x-guardproxy-degraded"] = "true"
        return h
