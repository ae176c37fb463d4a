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
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _abuse import abuse_phase, fmt  # noqa: E402 - bench modules import each other as scripts, like bench/run.py
from _setup import PLAY_KEY, GpVariant, start_guardproxy, start_mock  # noqa: E402


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


def phase(root: str, seconds: float, rate: float, kind: str | None) -> dict[str, Any]:
    """One phase: /healthz polled back to back, a normal request every 50 ms, hostile ones at ``rate``/s."""
    bodies = _hostile_bodies(kind, int(seconds * rate) + 1) if kind else []
    r = abuse_phase(root, seconds, rate, bodies, PLAY_KEY, timeout=120)
    return {"kind": kind or "baseline", "healthz": r["healthz"], "chat": r["chat"], "hostile": r["fired"],
            "hostile_outcomes": r["outcomes"]}


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
        print(f"{r['kind']:16s} {fmt(h['p50_ms']):>11s} {fmt(h['p99_ms'])} {fmt(h['max_ms'])}"
              f" {fmt(c['p50_ms']):>9s} {fmt(c['p99_ms'])} {fmt(x['p50_ms']):>11s} {fmt(x['p99_ms'])}"
              f"  {r['hostile_outcomes']}")
    if args.json:
        args.json.write_text(json.dumps({"seconds": args.seconds, "rate": args.rate, "results": results}, indent=2))


if __name__ == "__main__":
    main()
