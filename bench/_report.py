"""Render a benchmark result document (the JSON ``bench/run.py`` writes) as Markdown tables."""

from __future__ import annotations

from typing import Any

TARGETS = ("Targets (2-core box): full policy >= 20x LiteLLM req/s at 32 connections; <= 0.5 ms p50 over direct at "
           "1 connection; Redis >= 10x LiteLLM; streaming TTFT overhead <= 1 ms.")


def _f(v: Any, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _row(c: dict[str, Any], tag: str) -> str:
    a, b = c.get(f"{tag}@32") or {}, c.get(f"{tag}@1") or {}
    errs = (a.get("errors") or 0) + (b.get("errors") or 0)
    return (f"| {c['label']} | {_f(a.get('rps'))} | {_f(b.get('p50_ms'), '{:.2f}')} | {_f(b.get('p99_ms'), '{:.2f}')}"
            f" | {_f(a.get('p50_ms'), '{:.2f}')} | {_f(a.get('p99_ms'), '{:.2f}')} | {_f(a.get('cpu_us_per_req'))}"
            f" | {_f(c.get('peak_rss_mb'))} | {errs} |")


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.1f}x" if a >= b else f"{a / b:.3f}x"


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    out = [f"Machine: {m['nproc']} CPUs, {m['cpu']}, Python {m['python']}; {m['time']}; load average at start "
           f"{m['loadavg_start'][0]:.2f}, at end {m.get('loadavg_end', [0])[0]:.2f}. Median of {res['rounds']} "
           f"interleaved rounds x {res['seconds']:.0f} s per cell.", ""]
    head = ("| contender | req/s @32 | p50 ms @1 | p99 ms @1 | p50 ms @32 | p99 ms @32 | CPU µs/req | peak RSS MB "
            "| errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    cs = res.get("contenders", [])
    by = {c["name"]: c for c in cs}
    out += ["Tool-call request (0.4 KB body, support-agent key; the mock answers an allowed "
            "get_ticket_history call):", "", head]
    out += [_row(c, "0.4KB") for c in cs]

    def rps(name: str, tag: str = "0.4KB") -> float | None:
        return ((by.get(name) or {}).get(f"{tag}@32") or {}).get("rps")

    def p50(name: str) -> float | None:
        return ((by.get(name) or {}).get("0.4KB@1") or {}).get("p50_ms")

    d = p50("direct")
    overhead: dict[str, float] = {}
    for n in by:
        v = p50(n)
        if v is not None and d is not None:
            overhead[n] = v - d
    out += ["", "Ratios and overheads:", "",
            f"- guardproxy full policy (memory) / LiteLLM req/s: {_ratio(rps('gp-mem'), rps('litellm'))}",
            f"- same, tracing off / LiteLLM req/s: {_ratio(rps('gp-policies'), rps('litellm'))}",
            f"- guardproxy full policy (Redis) / LiteLLM req/s: {_ratio(rps('gp-redis'), rps('litellm'))}",
            f"- guardproxy full policy (memory) / direct req/s: {_ratio(rps('gp-mem'), rps('direct'))}",
            "- p50 overhead over direct at 1 connection: " + ", ".join(
                f"{n} {v:+.2f} ms" for n, v in overhead.items() if n != "direct")]
    sized = [c for c in cs if any(k.startswith(("20KB", "400KB")) for k in c)]
    if sized:
        out += ["", "Body size (long histories; the support policy compresses prompts above 4000 tokens to "
                "3000 before forwarding):", "", head.replace("| contender |", "| contender, body |")]
        for tag in ("20KB", "400KB"):
            for c in sized:
                out.append(_row({**c, "label": f"{c['label']}, {tag}"}, tag))
    if res.get("ttft"):
        out += ["", "Streaming, time to first content chunk (sequential, one keep-alive connection):", "",
                "| contender: reply | TTFT p50 ms | TTFT p90 ms | whole stream p50 ms |", "|---|---:|---:|---:|"]
        out += [f"| {k} | {v['ttft_p50_ms']:.2f} | {v['ttft_p90_ms']:.2f} | {v['total_p50_ms']:.2f} |"
                for k, v in res["ttft"].items()]
    if res.get("scaling"):
        out += ["", "Scaling (Redis store, tracing off, 32 connections):", "",
                "| setup | req/s @32 | p50 ms @32 | p99 ms @32 | CPU µs/req (all workers) | peak RSS MB |",
                "|---|---:|---:|---:|---:|---:|"]
        for c in res["scaling"]:
            a = c.get("0.4KB@32") or {}
            out.append(f"| {c['label']} | {_f(a.get('rps'))} | {_f(a.get('p50_ms'), '{:.2f}')} | "
                       f"{_f(a.get('p99_ms'), '{:.2f}')} | {_f(a.get('cpu_us_per_req'))} | "
                       f"{_f(c.get('peak_rss_mb'))} |")
    for note in res.get("notes", []):
        out += ["", f"Note: {note}"]
    out += ["", TARGETS]
    return "\n".join(out) + "\n"
