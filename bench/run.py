"""Side-by-side benchmark: the upstream directly, guardproxy (feature ladder) and the LiteLLM proxy.

Run from the repo root with the project venv active:

    python bench/run.py            # full run (~12 min): 3 rounds x 6 s per cell, body sizes, TTFT, scaling
    python bench/run.py --quick    # ~2 min smoke run: 1 round x 2 s
    python bench/run.py --profile  # also py-spy the full-policy proxy under load

Everything runs on loopback against ``guardproxy mock-upstream``. Measurements are interleaved:
each round visits every contender in turn (32 connections, then 1), after a warm-up, so drift in
machine load hits all of them alike; the table shows the median over rounds. Results go to
``bench/results/<timestamp>.json`` and ``.md``. Needs ``wrk`` (``apt-get install -y wrk``), Redis on
127.0.0.1:6379 (database 13 is flushed) and, for LiteLLM, ``bench/.venv-litellm`` (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _profile  # noqa: E402
from _load import WrkResult, lua_script, ttft, wrk  # noqa: E402
from _procs import Server, peak_rss_mb  # noqa: E402
from _report import render  # noqa: E402
from _setup import (  # noqa: E402
    LITELLM_KEY,
    PASS_KEY,
    PLAY_KEY,
    REDIS_URL,
    ROOT,
    SUPPORT_KEY,
    GpVariant,
    body_bytes,
    litellm_available,
    start_floor,
    start_guardproxy,
    start_litellm,
    start_mock,
    start_sink,
    stream_body,
    tool_body,
)

FULL = ("org-base.yaml", "support-agent.yaml")
LADDER = [
    GpVariant("gp-pass", "guardproxy pass-through (key with no policy)", ("support-agent.yaml",), key=PASS_KEY),
    GpVariant("gp-policies", "+ policies (support-agent + org-base)", FULL),
    GpVariant("gp-mem", "+ tracing, no-op exporter (memory store)", FULL, tracing="noop"),
    GpVariant("gp-redis", "+ Redis store", FULL, store=REDIS_URL, tracing="noop"),
    GpVariant("gp-otlp", "+ OTLP export to a local sink", FULL, store=REDIS_URL, tracing="otlp"),
]
SCALING = [
    GpVariant("gp-redis-1w", "Redis, tracing off, 1 process", FULL, store=REDIS_URL),
    GpVariant("gp-redis-2w", "Redis, tracing off, --workers 2", FULL, store=REDIS_URL, workers=2),
]
SIZES = {"20KB": 20_000, "400KB": 400_000}


@dataclass
class Contender:
    name: str
    label: str
    server: Server
    key: str
    path: str = "/v1/chat/completions"
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.root + self.path


def _cell(c: Contender, tag: str, script: Path, conns: int, seconds: float) -> WrkResult:
    r = wrk(c.url, script, connections=conns, seconds=seconds, pid=c.server.pid)
    c.runs.setdefault(tag, []).append(asdict(r))
    print(f"    {c.name:<14} {tag:<10} {r.rps:9.0f} req/s  p50 {r.p50_ms:8.2f} ms  p99 {r.p99_ms:8.2f} ms"
          f"  cpu {r.cpu_us_per_req or 0:7.0f} µs/req  err {r.errors}", flush=True)
    return r


def _matrix(contenders: list[Contender], bodies: dict[str, bytes], rundir: Path, *, rounds: int, seconds: float,
            warmup: float, conns: tuple[int, ...] = (32, 1)) -> None:
    scripts = {(c.name, b): lua_script(rundir / f"{c.name}-{b}.lua", raw, c.key)
               for c in contenders for b, raw in bodies.items()}
    for c in contenders:
        for b in bodies:
            wrk(c.url, scripts[(c.name, b)], connections=32, seconds=warmup, pid=None)
    for rnd in range(rounds):
        print(f"  round {rnd + 1}/{rounds}", flush=True)
        for c in contenders:
            for b in bodies:
                for n in conns:
                    _cell(c, f"{b}@{n}", scripts[(c.name, b)], n, seconds)


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(c: Contender) -> dict[str, Any]:
    out: dict[str, Any] = {"name": c.name, "label": c.label, "peak_rss_mb": peak_rss_mb(c.server.pid)}
    for tag, runs in c.runs.items():
        out[tag] = {k: _median(runs, k) for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")}
        out[tag]["errors"] = sum(r["errors"] for r in runs)
    return out


def _redis_flush() -> None:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()


def machine() -> dict[str, Any]:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "?")
    return {"nproc": os.cpu_count(), "cpu": model, "loadavg_start": os.getloadavg(),
            "python": sys.version.split()[0], "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round x 2 s per cell, fewer TTFT samples")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--skip-litellm", action="store_true")
    ap.add_argument("--skip-sizes", action="store_true")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--floor", action="store_true",
                    help="add a bare Starlette + aiohttp forwarder (the stack's floor) as a contender")
    ap.add_argument("--profile", action="store_true", help="py-spy the full-policy proxy under load")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temp folder (configs, server and audit logs)")
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 6.0)
    warmup = 1.0 if args.quick else 3.0
    n_ttft = 50 if args.quick else 300
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    results: dict[str, Any] = {"machine": machine(), "rounds": rounds, "seconds": seconds, "notes": []}
    rundir = Path(tempfile.mkdtemp(prefix="guardproxy-bench-"))
    servers: list[Server] = []
    print(f"work folder (configs, logs): {rundir}", flush=True)
    try:
        _redis_flush()
        mock = start_mock(rundir)
        servers.append(mock)
        upstream = mock.root + "/v1"
        sink = start_sink(rundir)
        servers.append(sink)
        contenders = [Contender("direct", "upstream directly (mock-upstream)", mock, SUPPORT_KEY)]
        if args.floor:
            fl = start_floor(upstream, rundir)
            servers.append(fl)
            contenders.append(Contender("floor", "bare Starlette + aiohttp forwarder (floor)", fl, SUPPORT_KEY))
        for v in LADDER:
            srv = start_guardproxy(v, upstream, rundir, sink=sink.root + "/v1/traces")
            servers.append(srv)
            contenders.append(Contender(v.name, v.label, srv, v.key))
        why = None if not args.skip_litellm else "skipped (--skip-litellm)"
        why = why or litellm_available()
        if why is None:
            try:
                ll = start_litellm(upstream, rundir)
                servers.append(ll)
                contenders.append(Contender("litellm", "LiteLLM proxy (budget + tool_permission)", ll, LITELLM_KEY))
            except RuntimeError as exc:
                why = f"LiteLLM failed to start: {exc}"
        if why:
            results["notes"].append(f"LiteLLM not measured: {why}")
            print(f"note: LiteLLM not measured: {why}", flush=True)
        by = {c.name: c for c in contenders}

        print(f"main matrix: 0.4KB tool-call body, {rounds} rounds x {seconds:.0f}s", flush=True)
        _matrix(contenders, {"0.4KB": body_bytes(tool_body())}, rundir, rounds=rounds, seconds=seconds,
                warmup=warmup)

        if not args.skip_sizes:
            sized = [by[n] for n in ("direct", "gp-pass", "gp-mem", "litellm") if n in by]
            print(f"body sizes: {', '.join(SIZES)}", flush=True)
            _matrix(sized, {k: body_bytes(tool_body(v)) for k, v in SIZES.items()}, rundir, rounds=rounds,
                    seconds=seconds, warmup=warmup)

        print("streaming time to first token", flush=True)
        text, tools = body_bytes(stream_body(False)), body_bytes(stream_body(True))
        ttfts: dict[str, Any] = {}
        cases = [("direct", "text", text, SUPPORT_KEY),
                 ("gp-mem", "text (playground key: org-base)", text, PLAY_KEY),
                 ("gp-pass", "text (no policy)", text, PASS_KEY),
                 ("litellm", "text", text, LITELLM_KEY),
                 ("direct", "tool call", tools, SUPPORT_KEY),
                 ("gp-mem", "tool call (support-agent)", tools, SUPPORT_KEY),
                 ("litellm", "tool call", tools, LITELLM_KEY)]
        for name, what, raw, key in cases:
            if name in by:
                ttfts[f"{name}: {what}"] = r = ttft(by[name].url, raw, key, n=n_ttft)
                print(f"    {name:<10} {what:<34} ttft p50 {r['ttft_p50_ms']:7.2f} ms", flush=True)
        results["ttft"] = ttfts

        if args.profile:
            c = by["gp-mem"]
            script = lua_script(rundir / "profile.lua", body_bytes(tool_body()), c.key)
            load = threading.Thread(target=wrk, args=(c.url, script), kwargs={
                "connections": 32, "seconds": 14, "pid": None})
            load.start()
            time.sleep(2)
            report = _profile.record(c.server.pid, 10, rundir / "profile", load)
            results["profile"] = report or "py-spy not found (pip install py-spy)"
            print(results["profile"], flush=True)

        results["contenders"] = [summarize(c) for c in contenders]

        if not args.skip_scaling:
            print("scaling: Redis store, tracing off, 1 process vs --workers 2", flush=True)
            scaled = []
            for v in SCALING:
                srv = start_guardproxy(v, upstream, rundir)
                servers.append(srv)
                scaled.append(Contender(v.name, v.label, srv, v.key))
            _matrix(scaled, {"0.4KB": body_bytes(tool_body())}, rundir, rounds=rounds, seconds=seconds,
                    warmup=warmup, conns=(32,))
            results["scaling"] = [summarize(c) for c in scaled]
        results["machine"]["loadavg_end"] = os.getloadavg()
    finally:
        for s in reversed(servers):
            s.stop()
    outdir = ROOT / "bench" / "results"
    outdir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (outdir / f"{stamp}.json").write_text(json.dumps(results, indent=2))
    md = render(results)
    (outdir / f"{stamp}.md").write_text(md)
    print("\n" + md)
    if args.keep_logs:
        print(f"results: bench/results/{stamp}.json and .md (server logs in {rundir})")
    else:
        shutil.rmtree(rundir, ignore_errors=True)  # audit logs of a full run are hundreds of MB
        print(f"results: bench/results/{stamp}.json and .md")


if __name__ == "__main__":
    main()
