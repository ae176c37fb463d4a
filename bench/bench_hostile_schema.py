"""Benchmark: ``/healthz`` and a normal chat request while hostile schema requests arrive at 10 per second.

Run: ``python bench/bench_hostile_schema.py [--seconds 20] [--rate 10] [--kinds issue-patterns,...]``.
Starts ``guardproxy mock-upstream`` and ``guardproxy serve`` (the shipped policies, memory store) like
``bench/run.py`` does, then runs one baseline phase and one phase per hostile kind. In every phase one
client polls ``/healthz`` back to back and another sends the support agent's normal tool turn every 50 ms;
in the hostile phases a third fires hostile requests open-loop at ``--rate`` per second, each with schemas
never seen before (so the proxy's schema cache cannot help). Prints p50/p99 of each, and the hostile
requests' outcomes. Not a test: no assertions, only figures.

Hostile kinds (all as the playground key, whose tools are allowed and whose schemas are the request's):

- ``issue-patterns``: the issue's 100 tools, each with a distinct ``\\p{L}{200}`` pattern (18 KB).
- ``heavy-patterns``: 100 tools, each with a distinct pattern just within the per-pattern cap, so they
  compile (until the request's compile budget runs out).
- ``backref-anyof``: the issue's 120 ``anyOf`` branches of ``(\\w+\\s?)+\\1…$``.
- ``ref-bomb``: 2 KB of ``$ref`` to ``$ref`` that expand to 10^11 subschemas.
- ``many-tools``: 10,000 tools (1.5 MB).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import (  # noqa: E402 - bench modules import each other as scripts, like bench/run.py
    PLAY_KEY,
    SUPPORT_KEY,
    GpVariant,
    body_bytes,
    start_guardproxy,
    start_mock,
    tool_body,
)


def _tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def _pattern_tools(pattern: Callable[[str, int], str]) -> list[dict[str, Any]]:
    tag = uuid.uuid4().hex[:10]
    return [_tool(f"lookup_{i}", {"type": "object", "properties": {"q": {"type": "string",
                                                                         "pattern": pattern(tag, i)}}})
            for i in range(100)]


def issue_patterns() -> list[dict[str, Any]]:
    return _pattern_tools(lambda tag, i: rf"\p{{L}}{{200}}{tag}{i}")


def heavy_patterns() -> list[dict[str, Any]]:
    return _pattern_tools(lambda tag, i: rf"^\p{{L}}{{5}}{tag}{i}$")


def backref_anyof() -> list[dict[str, Any]]:
    tag = uuid.uuid4().hex[:10]
    branches = [{"type": "string", "pattern": rf"^(\w+\s?)+\1-{tag}-{i}$"} for i in range(120)]
    return [_tool("summarize", {"type": "object", "properties": {"text": {"anyOf": branches}}})]


def ref_bomb() -> list[dict[str, Any]]:
    defs: dict[str, Any] = {"l0": {"type": "string", "description": uuid.uuid4().hex}}
    for k in range(1, 12):
        defs[f"l{k}"] = {"allOf": [{"$ref": f"#/$defs/l{k - 1}"}] * 10}
    return [_tool("bomb", {"type": "object", "$defs": defs, "properties": {"text": {"$ref": "#/$defs/l11"}}})]


def many_tools() -> list[dict[str, Any]]:
    return [_tool(f"t{i}", {"type": "object", "properties": {"q": {"type": "string"}}}) for i in range(10_000)]


POLICIES = ("org-base.yaml", "support-agent.yaml")  # the shipped policies, as in bench/run.py's full ladder

KINDS: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "issue-patterns": issue_patterns, "heavy-patterns": heavy_patterns, "backref-anyof": backref_anyof,
    "ref-bomb": ref_bomb, "many-tools": many_tools,
}


# The mock model calls a declared tool when the last user turn names it followed by JSON arguments: the
# hostile argument for the backtracking pattern and the reference bomb (before the fix, validating them
# was the stall).
TRIGGERS = {"backref-anyof": 'summarize {"text": "' + "word " * 30 + '!"}', "ref-bomb": 'bomb {"text": 1}'}


def _hostile_bodies(kind: str, n: int) -> list[bytes]:
    def one() -> bytes:
        content = TRIGGERS.get(kind, "hi")
        return orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}],
                             "tools": KINDS[kind]()})

    # 10,000 tools are refused by their count before any schema is looked at: one 1.5 MB body will do.
    return [one()] * n if kind == "many-tools" else [one() for _ in range(n)]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50_ms": _pct(values, 0.5), "p99_ms": _pct(values, 0.99),
            "max_ms": max(values) if values else None, "mean_ms": statistics.fmean(values) if values else None}


def _loop(stop: threading.Event, out: list[float], send: Callable[[httpx.Client], httpx.Response],
          root: str, pause: float) -> None:
    with httpx.Client(base_url=root, timeout=120) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            send(client).raise_for_status()
            out.append((time.perf_counter() - t0) * 1000)
            if pause:
                stop.wait(pause)


def phase(root: str, seconds: float, rate: float, kind: str | None) -> dict[str, Any]:
    """One phase: /healthz polled back to back, a normal request every 50 ms, hostile ones at ``rate``/s."""
    normal = body_bytes(tool_body())
    auth = {"content-type": "application/json"}
    health: list[float] = []
    chat: list[float] = []
    hostile: list[float] = []
    outcomes: Counter[str] = Counter()
    stop = threading.Event()
    bodies = _hostile_bodies(kind, int(seconds * rate) + 1) if kind else []
    workers = [
        threading.Thread(target=_loop, args=(stop, health, lambda c: c.get("/healthz"), root, 0.0)),
        threading.Thread(target=_loop, args=(stop, chat, lambda c: c.post(
            "/v1/chat/completions", content=normal, headers={**auth, "authorization": f"Bearer {SUPPORT_KEY}"}),
            root, 0.05)),
    ]
    for w in workers:
        w.start()
    fired: list[threading.Thread] = []

    def fire(body: bytes) -> None:
        t0 = time.perf_counter()
        try:
            r = httpx.post(root + "/v1/chat/completions", content=body, timeout=120,
                           headers={**auth, "authorization": f"Bearer {PLAY_KEY}"})
            code = r.json().get("error", {}).get("code") if r.status_code >= 400 else "ok"
            outcomes[f"{r.status_code} {code}"] += 1
        except httpx.HTTPError as exc:
            outcomes[type(exc).__name__] += 1
        hostile.append((time.perf_counter() - t0) * 1000)

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
    return {"kind": kind or "baseline", "healthz": _summary(health), "chat": _summary(chat),
            "hostile": _summary(hostile), "hostile_outcomes": dict(outcomes)}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--rate", type=float, default=10.0, help="hostile requests per second")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated hostile kinds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    with tempfile.TemporaryDirectory(prefix="gp-hostile-schema-") as tmp:
        rundir = Path(tmp)
        mock = start_mock(rundir)
        gp = start_guardproxy(GpVariant("hostile", "hostile schemas", POLICIES), mock.root + "/v1", rundir)
        try:
            results = [phase(gp.root, args.seconds, args.rate, None)]
            for kind in kinds:
                results.append(phase(gp.root, args.seconds, args.rate, kind))
        finally:
            gp.stop()
            mock.stop()
    print(f"{'phase':16s} {'healthz p50':>11s} {'p99':>8s} {'max':>8s} {'chat p50':>9s} {'p99':>8s}"
          f" {'hostile p50':>11s} {'p99':>8s}  outcomes")
    for r in results:
        h, c, x = r["healthz"], r["chat"], r["hostile"]
        print(f"{r['kind']:16s} {_fmt(h['p50_ms']):>11s} {_fmt(h['p99_ms'])} {_fmt(h['max_ms'])}"
              f" {_fmt(c['p50_ms']):>9s} {_fmt(c['p99_ms'])} {_fmt(x['p50_ms']):>11s} {_fmt(x['p99_ms'])}"
              f"  {r['hostile_outcomes']}")
    if args.json:
        args.json.write_text(json.dumps({"seconds": args.seconds, "rate": args.rate, "results": results}, indent=2))


if __name__ == "__main__":
    main()
