"""A tiny OTLP/HTTP traces receiver for tests: decodes each ExportTraceServiceRequest, keeps raw bodies."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class OtlpReceiver:
    """A tiny OTLP/HTTP traces endpoint: decodes each POSTed ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.raw: list[bytes] = []
        self.paths: list[str] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                msg = ExportTraceServiceRequest()
                msg.ParseFromString(body)
                with receiver.lock:
                    receiver.paths.append(self.path)
                    receiver.raw.append(body)
                    receiver.requests.append(msg)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, span) for every span received so far."""
        out: list[tuple[dict[str, Any], Any]] = []
        with self.lock:
            reqs = list(self.requests)
        for req in reqs:
            for rs in req.resource_spans:
                res = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    out.extend((res, s) for s in ss.spans)
        return out

    def wait_for(self, predicate: Callable[[list[tuple[dict[str, Any], Any]]], bool],
                 timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.spans()):
                return
            time.sleep(0.1)
        raise AssertionError(f"spans not received in {timeout} s: {[s.name for _, s in self.spans()]}")

    def data(self) -> bytes:
        """Every exported body, concatenated (protobuf strings are plain UTF-8 inside: greppable)."""
        with self.lock:
            return b"".join(self.raw)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
