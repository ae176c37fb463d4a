"""A tiny OTLP/HTTP sink for the benchmarks: accepts ``POST /v1/traces`` and throws the spans away.

Answers 200 with an empty ``ExportTraceServiceResponse`` (an empty protobuf body) and counts
requests and bytes (``GET /stats``). Usage: ``python bench/otlp_sink.py --port 4318``.
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    exports = 0
    received_bytes = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/traces":
            self._answer(404, b"", "text/plain")
            return
        type(self).exports += 1
        type(self).received_bytes += length
        self._answer(200, b"", "application/x-protobuf")

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/stats":
            body = json.dumps({"exports": self.exports, "bytes": self.received_bytes}).encode()
            self._answer(200, body, "application/json")
        else:
            self._answer(200, b"ok", "text/plain")

    def _answer(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), _Sink)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
