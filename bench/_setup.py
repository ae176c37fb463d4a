"""What the benchmarks run: request bodies, guardproxy and LiteLLM configs, and how to start each server.

Every contender talks to the same ``guardproxy mock-upstream``. guardproxy variants differ in one
thing at a time (the feature ladder); LiteLLM gets one model route to the same upstream, its
proxy-wide ``max_budget`` (tracked in memory; without a database LiteLLM does not enforce it) and its
``tool_permission`` guardrail with the support agent's allowlist.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from _procs import Server, free_port, start

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LITELLM_VENV = BENCH / ".venv-litellm"
REDIS_URL = "redis://127.0.0.1:6379/13"

SUPPORT_KEY = "sk-bench-support"
PLAY_KEY = "sk-bench-playground"
PASS_KEY = "sk-bench-passthrough"
LITELLM_KEY = "sk-bench-litellm"

TICKET_TOOL = {"type": "function", "function": {
    "name": "get_ticket_history", "description": "Past messages of a support ticket",
    "parameters": {"type": "object", "properties": {"ticket_id": {"type": "string"}},
                   "required": ["ticket_id"], "additionalProperties": False}}}
# The mock answers a tool call when the last user turn names a declared tool followed by JSON.
TRIGGER = 'Please check: get_ticket_history {"ticket_id": "T-1042"}'
SYSTEM = "You are a tier-1 support agent for Acme. Use the tools; never promise refunds."


def _filler(rng: random.Random, size: int) -> str:
    words = ("order", "refund", "shipping", "account", "invoice", "delayed", "package", "customer", "charge",
             "subscription", "cancel", "address", "warehouse", "tracking", "number", "support", "premium",
             "december", "broken", "replacement", "thanks", "please", "urgent", "again", "still")
    out: list[str] = []
    n = 0
    while n < size:
        w = rng.choice(words) + (str(rng.randrange(1000)) if rng.random() < 0.1 else "")
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


def tool_body(history_bytes: int = 0) -> dict[str, Any]:
    """A support-agent turn whose answer is an allowed ``get_ticket_history`` call; ``history_bytes``
    of earlier turns make the long-history variants (20 KB, 400 KB)."""
    rng = random.Random(7)
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    size, turn = 0, 0
    while size < history_bytes:
        text = _filler(rng, 380)
        messages.append({"role": "user" if turn % 2 == 0 else "assistant", "content": text})
        size += len(text) + 40
        turn += 1
    messages.append({"role": "user", "content": TRIGGER})
    return {"model": "gpt-4o-mini", "max_tokens": 256, "messages": messages, "tools": [TICKET_TOOL]}


def stream_body(tool_call: bool) -> dict[str, Any]:
    body = tool_body() if tool_call else {
        "model": "gpt-4o-mini", "max_tokens": 256,
        "messages": [{"role": "user", "content": "Hello! Summarise the status of my last order in two sentences."}]}
    return {**body, "stream": True}


def body_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class GpVariant:
    """One guardproxy configuration of the ladder."""

    name: str
    label: str
    policies: tuple[str, ...]  # file names under policies/
    store: str = "memory"
    tracing: str = "none"  # none | noop | otlp
    key: str = SUPPORT_KEY
    workers: int = 1


def _gp_config(v: GpVariant, port: int, upstream: str, rundir: Path, sink: str | None) -> dict[str, Any]:
    route = {"api_base": upstream, "api_key": "sk-upstream-bench"}
    telemetry: dict[str, Any] = {"audit_log": str(rundir / f"{v.name}.audit.log")}
    if v.tracing == "otlp":
        telemetry.update(exporter="otlp", endpoint=sink)
    return {
        "server": {"host": "127.0.0.1", "port": port, "watch_policies": False},
        "policies": [str(rundir / f"{v.name}.policies")],
        "store": v.store,
        "models": [{"name": "gpt-4o-mini", "upstream": "openai/gpt-4o-mini", **route},
                   {"name": "gpt-4o", "upstream": "openai/gpt-4o", **route}],
        "keys": [{"id": "support-agent", "key": SUPPORT_KEY, "team": "support"},
                 {"id": "playground", "key": PLAY_KEY, "team": "sandbox"},
                 {"id": "bench-passthrough", "key": PASS_KEY, "team": "bench"}],
        "admin_keys": ["sk-bench-admin"],
        "telemetry": telemetry,
    }


def start_guardproxy(v: GpVariant, upstream: str, rundir: Path, sink: str | None = None) -> Server:
    port = free_port()
    pdir = rundir / f"{v.name}.policies"
    pdir.mkdir(parents=True, exist_ok=True)
    for name in v.policies:
        (pdir / name).write_text((ROOT / "policies" / name).read_text())
    cfg = rundir / f"{v.name}.yaml"
    cfg.write_text(yaml.safe_dump(_gp_config(v, port, upstream, rundir, sink)))
    if v.tracing == "noop":
        cmd = [sys.executable, str(BENCH / "serve_traced.py"), str(cfg)]
    else:
        cmd = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)]
        if v.workers > 1:
            cmd += ["--workers", str(v.workers)]
    return start(v.name, cmd, port=port, health="/healthz", logdir=rundir, cwd=ROOT,
                 env={"GUARDPROXY_LOG_LEVEL": "WARNING"})


def start_mock(rundir: Path) -> Server:
    port = free_port()
    return start("mock", [sys.executable, "-m", "proxy.cli", "mock-upstream", "--port", str(port)], port=port,
                 health="/healthz", logdir=rundir, cwd=ROOT)


def start_floor(upstream: str, rundir: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, str(BENCH / "floor_forwarder.py"), str(port), upstream + "/chat/completions"]
    return start("floor", cmd, port=port, health="/healthz", logdir=rundir, cwd=ROOT)


def start_sink(rundir: Path) -> Server:
    port = free_port()
    return start("otlp-sink", [sys.executable, str(BENCH / "otlp_sink.py"), "--port", str(port)], port=port,
                 health="/stats", logdir=rundir)


def litellm_available() -> str | None:
    """Why LiteLLM cannot run, or None."""
    if not (LITELLM_VENV / "bin" / "litellm").exists():
        return (f"{LITELLM_VENV}/bin/litellm not found: python -m venv bench/.venv-litellm && "
                "bench/.venv-litellm/bin/pip install 'litellm[proxy]' httptools")
    return None


def start_litellm(upstream: str, rundir: Path) -> Server:
    port = free_port()
    allow = ("get_customer_account", "get_ticket_history", "escalate_to_human", "apply_credit")
    config = {
        "model_list": [{"model_name": "gpt-4o-mini", "litellm_params": {
            "model": "openai/gpt-4o-mini", "api_base": upstream, "api_key": "sk-upstream-bench"}}],
        "litellm_settings": {"max_budget": 1000, "budget_duration": "30d", "telemetry": False},
        "guardrails": [{"guardrail_name": "tool-permission", "litellm_params": {
            "guardrail": "tool_permission", "mode": ["pre_call", "post_call"], "default_on": True,
            "default_action": "deny", "on_disallowed_action": "block",
            "rules": [{"id": f"allow-{t}", "tool_name": f"^{t}$", "decision": "allow"} for t in allow]}}],
        "general_settings": {"master_key": LITELLM_KEY},
    }
    cfg = rundir / "litellm.yaml"
    cfg.write_text(yaml.safe_dump(config))
    log_cfg = rundir / "litellm-logging.json"
    log_cfg.write_text(json.dumps({"version": 1, "disable_existing_loggers": False,
                                   "loggers": {"uvicorn.access": {"level": "WARNING"},
                                               "uvicorn": {"level": "WARNING"}}}))
    cmd = [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
           "--num_workers", "1", "--log_config", str(log_cfg)]
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION",
           "DISABLE_SCHEMA_UPDATE": "true", "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true"}
    return start("litellm", cmd, port=port, health="/health/liveliness", logdir=rundir, env=env, timeout=180)
