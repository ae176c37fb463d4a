"""``guardproxy serve`` with tracing on and a no-op span exporter (benchmarks only).

The config's ``telemetry.exporter`` offers ``none`` (no SDK at all: spans are never built) and
``console``/``otlp`` (export). To measure the cost of building and ending every span without the
cost of shipping them, this launcher builds the app exactly as ``guardproxy serve`` does and swaps
in a :class:`otel.tracing.Tracing` whose processor is the SDK's ``BatchSpanProcessor`` (as for OTLP)
in front of an exporter that drops the batch. Usage: ``python bench/serve_traced.py CONFIG``.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402

from otel.tracing import Tracing, TracingSettings  # noqa: E402


class DropExporter(SpanExporter):
    """Accepts every batch and keeps nothing."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


class NoExportTracing(Tracing):
    """Tracing with the real SDK provider, sampler and batch processor, and a dropping exporter."""

    def _processor(self, console_out: IO[str] | None) -> SpanProcessor:
        return BatchSpanProcessor(DropExporter(), max_queue_size=2048, schedule_delay_millis=2000,
                                  max_export_batch_size=512)


def main() -> None:
    import uvicorn

    from proxy.app import build_state, create_app
    from proxy.config import load_config
    from proxy.fastpath import FastPath
    from proxy.httpserver import http_protocol

    logging.basicConfig(level="WARNING")
    config = load_config(sys.argv[1])
    state = build_state(config)
    # "memory" only selects the SDK branch of Tracing.__init__; _processor above replaces the exporter.
    settings = TracingSettings(exporter="memory", service_name=config.telemetry.service_name or "guardproxy")
    state.telemetry.tracing = NoExportTracing(settings)
    app = create_app(config, state=state)
    gc.freeze()  # as guardproxy serve does
    # the HTTP protocol guardproxy serve runs, so the benchmark measures the stack that ships
    uvicorn.run(FastPath(app), host=config.server.host, port=config.server.port, loop="uvloop",
                http=http_protocol(config.server.body_read_timeout_s), ws="none",
                log_level="warning", access_log=False, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
