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
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import PLAY_KEY, SUPPORT_KEY, GpVariant, body_bytes, start_guardproxy, start_mock, tool_body  # noqa: E402
from bench_hostile_schema import POLICIES, _fmt, _loop, _summary  # noqa: E402


def phase(root: str, seconds: float, rate: float, prompt_mb: float | None) -> dict[str, object]:
    normal = body_bytes(tool_body())
    headers = {"content-type": "application/json"}
    health: list[float] = []
    chat: list[float] = []
    big: list[float] = []
    outcomes: Counter[str] = Counter()
    stop = threading.Event()
    workers = [
        threading.Thread(target=_loop, args=(stop, health, lambda c: c.get("/healthz"), root, 0.0)),
        threading.Thread(target=_loop, args=(stop, chat, lambda c: c.post(
            "/v1/chat/completions", content=normal, headers={**headers, "authorization": f"Bearer {SUPPORT_KEY}"}),
            root, 0.05)),
    ]
    fired: list[threading.Thread] = []
    rng = random.Random(1)

    def fire(body: bytes) -> None:
        t0 = time.perf_counter()
        r = httpx.post(root + "/v1/chat/completions", content=body, timeout=300,
                       headers={**headers, "authorization": f"Bearer {PLAY_KEY}"})
        outcomes[f"{r.status_code} {r.json().get('error', {}).get('code', 'ok')}"] += 1
        big.append((time.perf_counter() - t0) * 1000)

    # Bodies are made before the phase starts: generating 7 MB of text takes a core for a second, which on
    # a small machine would starve the proxy and be measured as its latency.
    bodies = []
    for _ in range(int(seconds * rate) + 1 if prompt_mb else 0):
        text = "".join(rng.choices(string.ascii_letters + string.digits + "  .,", k=int((prompt_mb or 0) * 1e6)))
        bodies.append(orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}))
    for w in workers:
        w.start()
    start = time.perf_counter()
    n = 0
    while bodies and time.perf_counter() - start < seconds:
        t = threading.Thread(target=fire, args=(bodies.pop(),))
        t.start()
        fired.append(t)
        n += 1
        time.sleep(max(0.0, start + n / rate - time.perf_counter()))
    time.sleep(max(0.0, start + seconds - time.perf_counter()))
    stop.set()
    for t in workers + fired:
        t.join()
    return {"phase": f"{prompt_mb} MB prompts" if prompt_mb else "baseline", "healthz": _summary(health),
            "chat": _summary(chat), "large": _summary(big), "outcomes": dict(outcomes)}


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
        assert isinstance(h, dict) and isinstance(c, dict) and isinstance(x, dict)
        print(f"{r['phase']:16s} {_fmt(h['p50_ms']):>11s} {_fmt(h['p99_ms'])} {_fmt(h['max_ms'])}"
              f" {_fmt(c['p50_ms']):>9s} {_fmt(c['p99_ms'])} {_fmt(x['p50_ms']):>9s}  {r['outcomes']}")


if __name__ == "__main__":
    main()
