"""guardproxy observability: tracing (OpenTelemetry), metrics (Prometheus), audit log.

Each is an object the app builds once at start-up and owns; nothing here touches the global
OpenTelemetry provider or the default Prometheus registry. The ops bundle (collector, Prometheus
scrape config, alert rules, Grafana dashboard) ships as package data next to this file.
"""

from otel import semconv
from otel.audit import AuditLog, redact
from otel.metrics import Metrics
from otel.tracing import ConversationLinks, Tracing, TracingSettings, mark_error, span_ids

__all__ = [
    "AuditLog",
    "ConversationLinks",
    "Metrics",
    "Tracing",
    "TracingSettings",
    "mark_error",
    "redact",
    "semconv",
    "span_ids",
]
