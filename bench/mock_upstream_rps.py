"""Throughput sanity check for ``guardproxy mock-upstream`` (the floor of the proxy benchmarks).

Starts the mock in a subprocess and loads it with ``wrk`` (``apt-get install -y wrk``) on three
paths: ``/healthz``, a non-streaming chat completion and a streamed one with usage. Prints req/s,
best of ``--runs``. Usage: ``python bench/mock_upstream_rps.py [--seconds 5] [--connections 64]``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MESSAGES = [{"role": "user", "content": "hello there, how are you?"}]
CASES: dict[str, dict[str, object] | None] = {
    "healthz": None,
    "chat": {"model": "gpt-4o-mini", "messages": MESSAGES},
    "chat-stream": {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
}


def _wrk(url: str, body: dict[str, object] | None, seconds: int, connections: int, tmp: Path) -> float:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s"]
    if body is not None:
        script = tmp / "post.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(json.dumps(body))}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise SystemExit(f"non-2xx responses:\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match, out
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from proxy.mock_upstream import run; run('127.0.0.1', 0)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().split()[3]
        with tempfile.TemporaryDirectory() as tmp:
            for name, body in CASES.items():
                path = "/healthz" if body is None else "/v1/chat/completions"
                runs = [
                    _wrk(base + path, body, args.seconds, args.connections, Path(tmp))
                    for _ in range(args.runs)
                ]
                best = max(runs)
                print(f"{name:12s} {best:10.0f} req/s  (wrk -t1 -c{args.connections}, best of {args.runs})")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
