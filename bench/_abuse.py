"""Latency under abuse: ``/healthz`` and a normal turn measured while a client fires prepared bodies.

In a phase one client polls ``/healthz`` back to back and another sends the support agent's normal tool
turn every 50 ms, while a third fires the given bodies open-loop at ``rate`` per second (each on its own
thread, so a slow answer does not delay the next). Shared by ``bench_hostile_schema.py`` and
``bench_large_prompt.py``.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
from _setup import SUPPORT_KEY, body_bytes, tool_body

JSON = {"content-type": "application/json"}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50_ms": _pct(values, 0.5), "p99_ms": _pct(values, 0.99),
            "max_ms": max(values) if values else None, "mean_ms": statistics.fmean(values) if values else None}


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:8.1f}"


def _loop(stop: threading.Event, out: list[float], send: Callable[[httpx.Client], httpx.Response],
          root: str, pause: float) -> None:
    with httpx.Client(base_url=root, timeout=120) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            send(client).raise_for_status()
            out.append((time.perf_counter() - t0) * 1000)
            if pause:
                stop.wait(pause)


def abuse_phase(root: str, seconds: float, rate: float, bodies: list[bytes], key: str,
                timeout: float) -> dict[str, Any]:
    """One phase of ``seconds``: summaries of ``healthz``, ``chat`` and ``fired``, and the fired ``outcomes``."""
    normal = body_bytes(tool_body())
    health: list[float] = []
    chat: list[float] = []
    fired_ms: list[float] = []
    outcomes: Counter[str] = Counter()
    stop = threading.Event()
    workers = [
        threading.Thread(target=_loop, args=(stop, health, lambda c: c.get("/healthz"), root, 0.0)),
        threading.Thread(target=_loop, args=(stop, chat, lambda c: c.post(
            "/v1/chat/completions", content=normal, headers={**JSON, "authorization": f"Bearer {SUPPORT_KEY}"}),
            root, 0.05)),
    ]
    for w in workers:
        w.start()
    fired: list[threading.Thread] = []

    def fire(body: bytes) -> None:
        t0 = time.perf_counter()
        try:
            r = httpx.post(root + "/v1/chat/completions", content=body, timeout=timeout,
                           headers={**JSON, "authorization": f"Bearer {key}"})
            code = r.json().get("error", {}).get("code") if r.status_code >= 400 else "ok"
            outcomes[f"{r.status_code} {code}"] += 1
        except httpx.HTTPError as exc:
            outcomes[type(exc).__name__] += 1
        fired_ms.append((time.perf_counter() - t0) * 1000)

    start = time.perf_counter()
    for i, body in enumerate(bodies):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if time.perf_counter() - start >= seconds:
            break
        t = threading.Thread(target=fire, args=(body,))
        t.start()
        fired.append(t)
    time.sleep(max(0.0, start + seconds - time.perf_counter()))
    stop.set()
    for t in workers + fired:
        t.join()
    return {"healthz": summary(health), "chat": summary(chat), "fired": summary(fired_ms),
            "outcomes": dict(outcomes)}
