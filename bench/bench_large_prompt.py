"""Benchmark: ``/healthz`` and a normal chat request while 7 MB prompts are in flight.

Run: ``python bench/bench_large_prompt.py [--seconds 20] [--rate 0.5] [--mb 7]``. Starts the mock and
``guardproxy serve`` (the shipped policies, memory store) like ``bench/run.py``, then runs a baseline phase
and a phase where a client sends prompts of ``--mb`` MB of random text at ``--rate`` per second (each
takes a second or more of tokenizer CPU, counted off the event loop). Prints p50/p99 of ``/healthz`` and of
the support agent's normal tool turn in both phases. Not a test: no assertions, only figures.
"""

from __future__ import annotations

import argparse
import random
import string
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _abuse import abuse_phase, fmt  # noqa: E402
from _setup import PLAY_KEY, GpVariant, start_guardproxy, start_mock  # noqa: E402
from bench_hostile_schema import POLICIES  # noqa: E402


def phase(root: str, seconds: float, rate: float, prompt_mb: float | None) -> dict[str, Any]:
    # Bodies are made before the phase starts: generating 7 MB of text takes a core for a second, which on
    # a small machine would starve the proxy and be measured as its latency.
    rng = random.Random(1)
    bodies = []
    for _ in range(int(seconds * rate) + 1 if prompt_mb else 0):
        text = "".join(rng.choices(string.ascii_letters + string.digits + "  .,", k=int((prompt_mb or 0) * 1e6)))
        bodies.append(orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}))
    r = abuse_phase(root, seconds, rate, bodies, PLAY_KEY, timeout=300)
    return {"phase": f"{prompt_mb} MB prompts" if prompt_mb else "baseline", "healthz": r["healthz"],
            "chat": r["chat"], "large": r["fired"], "outcomes": r["outcomes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=0.5, help="large prompts per second")
    parser.add_argument("--mb", type=float, default=7.0, help="size of each prompt in MB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gp-large-prompt-") as tmp:
        rundir = Path(tmp)
        mock = start_mock(rundir)
        gp = start_guardproxy(GpVariant("large", "large prompts", POLICIES), mock.root + "/v1", rundir)
        try:
            results = [phase(gp.root, args.seconds, args.rate, None),
                       phase(gp.root, args.seconds, args.rate, args.mb)]
        finally:
            gp.stop()
            mock.stop()
    print(f"{'phase':16s} {'healthz p50':>11s} {'p99':>8s} {'max':>8s} {'chat p50':>9s} {'p99':>8s}"
          f" {'large p50':>9s}  outcomes")
    for r in results:
        h, c, x = r["healthz"], r["chat"], r["large"]
        print(f"{r['phase']:16s} {fmt(h['p50_ms']):>11s} {fmt(h['p99_ms'])} {fmt(h['max_ms'])}"
              f" {fmt(c['p50_ms']):>9s} {fmt(c['p99_ms'])} {fmt(x['p50_ms']):>9s}  {r['outcomes']}")


if __name__ == "__main__":
    main()
