"""Tracing: one app-owned TracerProvider, W3C context in and out, spans passed explicitly.

The global OpenTelemetry provider and the global propagator are never touched: tests and several
apps in one process must not see each other's spans. Parents are passed as arguments rather than
taken from the ambient context, because a streamed response outlives the handler's contextvars.

When the exporter is ``"none"`` no SDK object is built and every helper returns the API's shared
``INVALID_SPAN`` (a non-recording span whose methods do nothing), so call sites need no ``if``.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Literal, get_args
from urllib.parse import urlsplit

import orjson
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import INVALID_SPAN, Link, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from otel.semconv import ERROR_TYPE, GEN_AI_CONVERSATION_ID

Exporter = Literal["none", "console", "otlp", "memory"]
EXPORTERS: frozenset[str] = frozenset(get_args(Exporter))
DEFAULT_OTLP_TRACES_ENDPOINT = "http://localhost:4318/v1/traces"


@dataclass(frozen=True)
class TracingSettings:
    """What to export and where. ``endpoint`` is the OTLP/HTTP traces URL; a bare base URL such as
    ``http://collector:4318`` gets ``/v1/traces`` appended (the OTLP spec's rule for the generic
    endpoint)."""

    exporter: Exporter = "none"
    endpoint: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    service_name: str = "guardproxy"
    capture_content: bool = False
    sample_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise ValueError(f"tracing exporter must be one of {sorted(EXPORTERS)}, got {self.exporter!r}")
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"tracing sample_ratio must be within [0, 1], got {self.sample_ratio!r}")

    @classmethod
    def from_env(
        cls, overrides: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None
    ) -> TracingSettings:
        """Settings from config ``overrides`` (keys = field names), the standard OTEL_* variables
        filling what the config leaves out (absent or None). The only place env is read."""
        env = os.environ if environ is None else environ
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        if "exporter" not in given and env.get("OTEL_TRACES_EXPORTER", "") in ("none", "console", "otlp"):
            given["exporter"] = env["OTEL_TRACES_EXPORTER"]
        if "endpoint" not in given:
            if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
                given["endpoint"] = env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
            elif env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
                given["endpoint"] = env["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + "/v1/traces"
        if "headers" not in given and env.get("OTEL_EXPORTER_OTLP_HEADERS"):
            given["headers"] = _parse_headers(env["OTEL_EXPORTER_OTLP_HEADERS"])
        if "service_name" not in given and env.get("OTEL_SERVICE_NAME"):
            given["service_name"] = env["OTEL_SERVICE_NAME"]
        return cls(**given)


def traces_url(endpoint: str | None) -> str:
    """The URL spans are POSTed to: as given if it has a path, else base + ``/v1/traces``."""
    if not endpoint:
        return DEFAULT_OTLP_TRACES_ENDPOINT
    if urlsplit(endpoint).path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def _parse_headers(raw: str) -> dict[str, str]:
    from opentelemetry.util.re import parse_env_headers

    return dict(parse_env_headers(raw, liberal=True))


class _HeaderGetter(Getter[Mapping[str, str]]):
    """Case-insensitive on plain dicts too (Starlette's Headers already are)."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            for k, v in carrier.items():
                if k.lower() == key:
                    value = v
                    break
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier.keys())


class ConversationLinks:
    """Bounded LRU: conversation id -> span context of that conversation's latest server span.

    Per process: with several workers a turn links to the previous turn only if the same worker
    served it; the conversation id attribute still groups every turn in the trace backend.
    """

    def __init__(self, maxsize: int = 10_000) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self._maxsize = maxsize
        self._last: OrderedDict[str, SpanContext] = OrderedDict()

    def previous(self, conv_id: str) -> SpanContext | None:
        ctx = self._last.get(conv_id)
        if ctx is not None:
            self._last.move_to_end(conv_id)
        return ctx

    def remember(self, conv_id: str, span_context: SpanContext) -> None:
        self._last[conv_id] = span_context
        self._last.move_to_end(conv_id)
        if len(self._last) > self._maxsize:
            self._last.popitem(last=False)

    def __len__(self) -> int:
        return len(self._last)


def span_ids(span: Span) -> tuple[str, str] | None:
    """(trace id, span id) as lowercase hex for the audit line, or None for a no-op span."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return trace.format_trace_id(ctx.trace_id), trace.format_span_id(ctx.span_id)


def mark_error(span: Span, error_type: str, description: str | None = None) -> None:
    """Status ERROR plus ``error.type`` (use the ProxyError code or the exception class name)."""
    if span.is_recording():
        span.set_attribute(ERROR_TYPE, error_type)
        span.set_status(Status(StatusCode.ERROR, description))


class Tracing:
    """The app's tracer. Build one at start-up, call :meth:`shutdown` at exit."""

    def __init__(
        self,
        settings: TracingSettings | None = None,
        *,
        console_out: IO[str] | None = None,
        max_conversations: int = 10_000,
    ) -> None:
        self.settings = settings or TracingSettings()
        self.enabled: bool = self.settings.exporter != "none"
        self.capture_content: bool = self.enabled and self.settings.capture_content
        self.memory_exporter: InMemorySpanExporter | None = None
        self.conversations = ConversationLinks(max_conversations)
        self._propagator = TraceContextTextMapPropagator()
        self._getter = _HeaderGetter()
        self._provider: TracerProvider | None = None
        self._tracer: trace.Tracer | None = None
        if not self.enabled:
            return
        # Everything passed explicitly so the SDK does not fill it from OTEL_* env behind our back
        # (the OTLP exporter still merges OTEL_EXPORTER_OTLP_*HEADERS itself; that is SDK behaviour).
        self._provider = TracerProvider(
            sampler=_sampler(self.settings.sample_ratio),
            resource=Resource({SERVICE_NAME: self.settings.service_name}),
            shutdown_on_exit=False,  # the app calls shutdown(); no atexit hook from us
            span_limits=SpanLimits(
                max_span_attributes=128,
                max_events=128,
                max_links=8,
                max_event_attributes=32,
                max_link_attributes=8,
                max_span_attribute_length=16_384,
            ),
        )
        self._provider.add_span_processor(self._processor(console_out))
        self._tracer = self._provider.get_tracer("guardproxy")

    def _processor(self, console_out: IO[str] | None) -> SpanProcessor:
        s = self.settings
        if s.exporter == "memory":
            self.memory_exporter = InMemorySpanExporter()
            return SimpleSpanProcessor(self.memory_exporter)
        if s.exporter == "console":
            out = console_out if console_out is not None else sys.stdout
            return SimpleSpanProcessor(ConsoleSpanExporter(service_name=s.service_name, out=out))
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(
            endpoint=traces_url(s.endpoint),
            headers=s.headers or None,
            timeout=10.0,
            compression=Compression.NoCompression,
        )
        return BatchSpanProcessor(
            exporter,
            max_queue_size=2048,
            schedule_delay_millis=2000,
            max_export_batch_size=512,
            export_timeout_millis=10_000,
        )

    def extract_context(self, headers: Mapping[str, str]) -> Context | None:
        """Parent context from inbound ``traceparent``/``tracestate``; None when disabled."""
        if self._tracer is None:
            return None
        return self._propagator.extract(headers, getter=self._getter)

    def inject(self, headers: dict[str, str], span: Span) -> None:
        """Write ``traceparent`` (and ``tracestate``) for ``span`` into upstream request headers."""
        if self._tracer is None or not span.get_span_context().is_valid:
            return
        self._propagator.inject(headers, context=trace.set_span_in_context(span))

    def start_server_span(
        self,
        name: str,
        context: Context | None = None,
        attributes: Attributes = None,
        *,
        conversation_id: str | None = None,
        start_time: int | None = None,
    ) -> Span:
        """Start (not activate) the request's SERVER span; the caller ends it (``span.end()`` or
        ``with``). With ``conversation_id`` the span links to that conversation's previous turn and
        becomes the one the next turn links to. ``start_time`` (epoch ns) backdates it to when the
        request arrived."""
        if self._tracer is None:
            return INVALID_SPAN
        links = None
        if conversation_id is not None:
            prev = self.conversations.previous(conversation_id)
            if prev is not None:
                links = [Link(prev)]
        span = self._tracer.start_span(
            name, context=context, kind=SpanKind.SERVER, attributes=attributes, links=links, start_time=start_time
        )
        if conversation_id is not None:
            span.set_attribute(GEN_AI_CONVERSATION_ID, conversation_id)
            self.conversations.remember(conversation_id, span.get_span_context())
        return span

    def start_child(
        self,
        name: str,
        *,
        parent: Span,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
    ) -> Span:
        """Start a child of ``parent`` (e.g. kind=CLIENT for the upstream call); caller ends it."""
        if self._tracer is None:
            return INVALID_SPAN
        return self._tracer.start_span(
            name, context=trace.set_span_in_context(parent), kind=kind, attributes=attributes
        )

    def record_content(self, span: Span, attribute: str, value: Any) -> None:
        """Attach message content (JSON-encoded) only when ``capture_content`` is on."""
        if self.capture_content and span.is_recording():
            text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
            span.set_attribute(attribute, text)

    def force_flush(self, timeout_millis: int = 10_000) -> bool:
        return True if self._provider is None else self._provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Flush and stop exporting; later calls to the helpers are no-ops. Idempotent."""
        provider, self._provider, self._tracer = self._provider, None, None
        self.enabled = self.capture_content = False
        if provider is not None:
            provider.shutdown()


def _sampler(ratio: float) -> Sampler:
    # ParentBased: an upstream caller's sampling decision wins, so traces are never half-recorded.
    return ParentBased(ALWAYS_ON if ratio >= 1.0 else TraceIdRatioBased(ratio))


__all__ = [
    "DEFAULT_OTLP_TRACES_ENDPOINT",
    "EXPORTERS",
    "ConversationLinks",
    "Exporter",
    "Tracing",
    "TracingSettings",
    "mark_error",
    "span_ids",
    "traces_url",
]
