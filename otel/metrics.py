"""Prometheus metrics on an app-owned registry, with bounded label values.

Label values come from three places, each bounded differently:

* config names (model, tool, rule, key, team): kept only if in the allowlist the app passes at
  start-up, else ``"other"`` — a typo'd model in a request must not mint a new series;
* fixed vocabularies (direction, mode, tool/approval/feedback outcome, reload result): anything
  outside the vocabulary becomes ``"other"``;
* code-chosen strings (route template, HTTP status, action, scope, op, repair outcome): must look
  like an identifier (``[A-Za-z0-9_./{}:-]``, <= 64 chars), else ``"other"``.

Never pass conversation ids, raw paths, user text or API key secrets (``key`` is the key's
configured name/id). Spend is kept as integer µ$ per label set and converted to USD only when
scraped, so the exported counter is exact rather than a running float sum.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

OTHER = "other"
NONE = "none"
TOOL_OUTCOMES = frozenset({"allowed", "denied", "escalated", "held", "repaired", "schema_denied", "stripped"})
APPROVAL_OUTCOMES = frozenset({"requested", "approved", "rejected", "expired"})
FEEDBACK_OUTCOMES = frozenset({"overridden", "confirmed"})
RELOAD_RESULTS = frozenset({"ok", "error"})

# Proxy overhead is a few ms; model calls run from ~100 ms to minutes for long generations.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
)
_CODE_LABEL = re.compile(r"[A-Za-z0-9_./{}:-]{1,64}")


def _pick(value: str | None, allowed: frozenset[str]) -> str:
    if value is None:
        return NONE
    return value if value in allowed else OTHER


def _code(value: str | int | None) -> str:
    if value is None:
        return NONE
    text = str(value)
    return text if _CODE_LABEL.fullmatch(text) else OTHER


class _Derived(Collector):
    """Spend in exact µ$ and the human-override ratio, both computed at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cost_micro: dict[tuple[str, str, str], int] = {}
        self.approvals_rejected = 0
        self.approvals_decided = 0
        self.feedback_overridden = 0
        self.feedback_total = 0

    def add_cost(self, labels: tuple[str, str, str], micro: int) -> None:
        with self._lock:
            self.cost_micro[labels] = self.cost_micro.get(labels, 0) + micro

    def count_decision(self, *, overridden: bool, feedback: bool) -> None:
        with self._lock:
            if feedback:
                self.feedback_total += 1
                self.feedback_overridden += overridden
            else:
                self.approvals_decided += 1
                self.approvals_rejected += overridden

    def retract(self, *, overridden: bool) -> None:
        """A feedback verdict was replaced: it no longer counts."""
        with self._lock:
            self.feedback_total -= 1
            self.feedback_overridden -= overridden

    def override_ratio(self) -> float:
        with self._lock:
            denominator = self.approvals_decided + self.feedback_total
            numerator = self.approvals_rejected + self.feedback_overridden
        return numerator / denominator if denominator else 0.0

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> Iterator[Metric]:
        cost = CounterMetricFamily(
            "guardproxy_cost_usd",
            "Spend in USD (accumulated exactly in integer micro-dollars).",
            labels=["team", "key", "model"],
        )
        with self._lock:
            items = list(self.cost_micro.items())
        for labels, micro in items:
            cost.add_metric(list(labels), micro / 1_000_000)
        yield cost
        yield GaugeMetricFamily(
            "guardproxy_human_override_ratio",
            "(rejected approvals + overridden feedback) / (decided approvals + feedback), since start.",
            value=self.override_ratio(),
        )


class Metrics:
    """All guardproxy metrics. Methods are cheap and never raise on odd label values."""

    def __init__(
        self,
        models: Iterable[str] = (),
        tools: Iterable[str] = (),
        rules: Iterable[str] = (),
        keys: Iterable[str] = (),
        teams: Iterable[str] = (),
    ) -> None:
        self.models = frozenset(models)
        self.tools = frozenset(tools)
        self.rules = frozenset(rules)
        self.keys = frozenset(keys)
        self.teams = frozenset(teams)
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests = Counter(
            "guardproxy_requests_total", "Requests by route, model, HTTP status and error code (none: served).",
            ["route", "model", "status", "code"], registry=r,
        )
        self._request_seconds = Histogram(
            "guardproxy_request_duration_seconds", "Request duration through the proxy, upstream included.",
            ["route", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self._upstream_seconds = Histogram(
            "guardproxy_upstream_duration_seconds", "Upstream model call duration.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self._tokens = Counter(
            "guardproxy_tokens_total", "Tokens by team, key, model and direction (input|output).",
            ["team", "key", "model", "direction"], registry=r,
        )
        self._decisions = Counter(
            "guardproxy_decisions_total", "Policy decisions by action, rule and mode (enforce|shadow).",
            ["action", "rule", "mode"], registry=r,
        )
        self._tool_calls = Counter(
            "guardproxy_tool_calls_total", "Tool calls by tool and outcome.", ["tool", "outcome"], registry=r,
        )
        self._downgrades = Counter(
            "guardproxy_downgrades_total", "Model downgrades.", ["from_model", "to_model"], registry=r,
        )
        self._compressions = Counter("guardproxy_compressions_total", "Prompt compressions.", registry=r)
        self._repairs = Counter(
            "guardproxy_repairs_total", "Output repairs by outcome.", ["outcome"], registry=r,
        )
        self._budget_refusals = Counter(
            "guardproxy_budget_refusals_total", "Requests refused for budget, by scope.",
            ["scope"], registry=r,
        )
        self._approvals = Counter(
            "guardproxy_approvals_total", "Human approvals by outcome.", ["outcome"], registry=r,
        )
        self._pending = Gauge("guardproxy_approvals_pending", "Approvals waiting for a human.", registry=r)
        self._feedback = Counter(
            "guardproxy_feedback_total", "Human verdicts on decisions by outcome (a replaced verdict counts "
            "again under its new outcome and once under guardproxy_feedback_retracted_total).", ["outcome"],
            registry=r,
        )
        self._feedback_retracted = Counter(
            "guardproxy_feedback_retracted_total", "Verdicts replaced by a later verdict on the same decision, "
            "by the outcome replaced.", ["outcome"], registry=r,
        )
        self._store_errors = Counter(
            "guardproxy_store_errors_total", "State store errors by operation.", ["op"], registry=r,
        )
        self._degraded = Counter(
            "guardproxy_degraded_requests_total", "Requests served in degraded mode (store unavailable).",
            registry=r,
        )
        self._reloads = Counter(
            "guardproxy_policy_reloads_total", "Policy reloads by result (ok|error).", ["result"], registry=r,
        )
        self._revision = Gauge(
            "guardproxy_policy_revision_info", "Active policy revision (value is always 1).",
            ["revision"], registry=r,
        )
        self._derived = _Derived()
        r.register(self._derived)
        # Series exist at 0 from the start, so rate()/increase() in alerts see the first event and
        # sums over outcomes are never empty.
        for outcome in APPROVAL_OUTCOMES:
            self._approvals.labels(outcome)
        for outcome in FEEDBACK_OUTCOMES:
            self._feedback.labels(outcome)
            self._feedback_retracted.labels(outcome)
        for result in RELOAD_RESULTS:
            self._reloads.labels(result)

    def _model(self, model: str | None) -> str:
        return _pick(model, self.models)

    def observe_request(self, route: str, model: str | None, status: int | str, seconds: float,
                        code: str | None = None) -> None:
        """``route`` is the route template (``/v1/chat/completions``), ``status`` the HTTP status, ``code``
        the error code of a refusal or failure (a registered code; anything else is ``other``)."""
        m = self._model(model)
        route_label = _code(route)
        self._requests.labels(route_label, m, _code(status), _code(code)).inc()
        self._request_seconds.labels(route_label, m).observe(seconds)

    def observe_upstream(self, model: str | None, seconds: float) -> None:
        self._upstream_seconds.labels(self._model(model)).observe(seconds)

    def add_usage(
        self,
        team: str | None,
        key: str | None,
        model: str | None,
        input_tokens: int,
        output_tokens: int,
        cost_micro: int,
    ) -> None:
        labels = (_pick(team, self.teams), _pick(key, self.keys), self._model(model))
        if input_tokens:
            self._tokens.labels(*labels, "input").inc(input_tokens)
        if output_tokens:
            self._tokens.labels(*labels, "output").inc(output_tokens)
        if cost_micro:
            self._derived.add_cost(labels, int(cost_micro))

    def decision(self, action: str, rule: str | None, shadow: bool) -> None:
        mode = "shadow" if shadow else "enforce"
        self._decisions.labels(_code(action), _pick(rule, self.rules), mode).inc()

    def tool_call(self, tool: str | None, outcome: str) -> None:
        self._tool_calls.labels(_pick(tool, self.tools), _pick(outcome, TOOL_OUTCOMES)).inc()

    def downgrade(self, frm: str | None, to: str | None) -> None:
        self._downgrades.labels(self._model(frm), self._model(to)).inc()

    def compression(self) -> None:
        self._compressions.inc()

    def repair(self, outcome: str) -> None:
        self._repairs.labels(_code(outcome)).inc()

    def budget_refusal(self, scope: str) -> None:
        self._budget_refusals.labels(_code(scope)).inc()

    def approval(self, outcome: str) -> None:
        """``requested`` when a call is held; ``approved|rejected|expired`` when it resolves.
        Only approved/rejected count as human decisions in the override ratio."""
        label = _pick(outcome, APPROVAL_OUTCOMES)
        self._approvals.labels(label).inc()
        if label in ("approved", "rejected"):
            self._derived.count_decision(overridden=label == "rejected", feedback=False)

    def set_pending(self, n: int) -> None:
        self._pending.set(n)

    def feedback(self, outcome: str, previous: str | None = None) -> None:
        """A verdict on a decision; ``previous`` is the verdict it replaces (one verdict per decision, so
        the override ratio counts decisions, not posts). Repeating the same verdict changes nothing."""
        label = _pick(outcome, FEEDBACK_OUTCOMES)
        if previous == outcome:
            return
        self._feedback.labels(label).inc()
        if label == OTHER:
            return
        self._derived.count_decision(overridden=label == "overridden", feedback=True)
        old = _pick(previous, FEEDBACK_OUTCOMES) if previous is not None else None
        if old is not None and old != OTHER:
            self._feedback_retracted.labels(old).inc()
            self._derived.retract(overridden=old == "overridden")

    def override_ratio(self) -> float:
        return self._derived.override_ratio()

    def store_error(self, op: str) -> None:
        self._store_errors.labels(_code(op)).inc()

    def degraded(self) -> None:
        self._degraded.inc()

    def reload(self, result: str, revision: str | None = None) -> None:
        """Count a reload; on ``ok`` with a revision, make it the only revision_info series."""
        label = _pick(result, RELOAD_RESULTS)
        self._reloads.labels(label).inc()
        if label == "ok" and revision:
            self._revision.clear()
            self._revision.labels(_code(revision)).set(1)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type); OpenMetrics when the scraper's Accept header asks for it."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


__all__ = [
    "APPROVAL_OUTCOMES",
    "FEEDBACK_OUTCOMES",
    "LATENCY_BUCKETS",
    "OTHER",
    "RELOAD_RESULTS",
    "TOOL_OUTCOMES",
    "Metrics",
]
