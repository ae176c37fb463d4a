"""Load generation: ``wrk`` with a Lua script for throughput and latency, a socket client for TTFT.

The Lua script posts one JSON body with the contender's key and rotates
``x-guardproxy-conversation-id`` over 1000 ids, as a fleet of agents would (one conversation id for
every request would hit the support policy's $0.50 per-conversation ceiling in a long run).
"""

from __future__ import annotations

import json
import re
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from _procs import cpu_seconds


def lua_script(path: Path, body: bytes, key: str) -> Path:
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body.decode())}\n"
        "local n = 0\n"
        "request = function()\n"
        "  n = n + 1\n"
        '  return wrk.format(nil, nil, {["Content-Type"] = "application/json", '
        f'["Authorization"] = "Bearer {key}", '
        '["x-guardproxy-conversation-id"] = "bench-conv-" .. (n % 1000)})\n'
        "end\n"
    )
    return path


@dataclass
class WrkResult:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx responses + socket errors
    cpu_us_per_req: float | None


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(text)
    return float(m.group(1)) * _UNIT[m.group(2)]


def wrk(url: str, script: Path, *, connections: int, seconds: float, pid: int | None) -> WrkResult:
    """One wrk run; CPU time of ``pid``'s process tree is sampled around it."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "--latency",
           "-s", str(script), url]
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    cpu1 = cpu_seconds(pid) if pid else 0.0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"(?m)^\s+50%\s+(\S+)\s*$", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"(?m)^\s+99%\s+(\S+)\s*$", out).group(1))  # type: ignore[union-attr]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    cpu = (cpu1 - cpu0) / requests * 1e6 if pid and requests else None
    return WrkResult(rps, requests, p50, p99, errors, cpu)


# -- streaming: time to first token ------------------------------------------------------------------
_CONTENT = re.compile(rb'"content":"[^"]|"tool_calls":\[\{')


class _Conn:
    """A keep-alive HTTP/1.1 connection that times the first content-bearing SSE event."""

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        self.host, self.port, self.path = u.hostname or "127.0.0.1", u.port or 80, u.path
        self.sock = socket.create_connection((self.host, self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def ttft(self, body: bytes, key: str, conversation: str) -> tuple[float, float]:
        """(seconds to the first chunk with content or a tool call, seconds to the end of the stream)."""
        req = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
               f"Authorization: Bearer {key}\r\nx-guardproxy-conversation-id: {conversation}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        t0 = time.perf_counter()
        self.sock.sendall(req)
        buf = b""
        first: float | None = None
        header_end = -1
        length: int | None = None
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            buf += data
            if header_end < 0:
                header_end = buf.find(b"\r\n\r\n")
                if header_end < 0:
                    continue
                head = buf[:header_end].decode("latin-1")
                status = int(head.split(" ", 2)[1])
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {buf[header_end:][:300]!r}")
                if m := re.search(r"(?im)^content-length:\s*(\d+)", head):
                    length = int(m.group(1))
            if first is None and _CONTENT.search(buf, header_end):
                first = time.perf_counter()
            body_part = buf[header_end + 4:]
            if (length is not None and len(body_part) >= length) or (
                    length is None and body_part.endswith(b"0\r\n\r\n") and b"[DONE]" in body_part):
                end = time.perf_counter()
                if first is None:
                    raise RuntimeError(f"stream had no content: {body_part[:300]!r}")
                return first - t0, end - t0


def ttft(url: str, body: bytes, key: str, *, n: int, warmup: int = 10) -> dict[str, float]:
    """Median and p90 TTFT and total stream time over ``n`` sequential requests on one connection."""
    conn = _Conn(url)
    try:
        firsts, totals = [], []
        for i in range(warmup + n):
            f, t = conn.ttft(body, key, f"bench-ttft-{i % 1000}")
            if i >= warmup:
                firsts.append(f * 1000)
                totals.append(t * 1000)
    finally:
        conn.close()
    firsts.sort()
    return {"ttft_p50_ms": statistics.median(firsts), "ttft_p90_ms": firsts[int(len(firsts) * 0.9) - 1],
            "total_p50_ms": statistics.median(totals)}
