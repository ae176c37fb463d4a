"""Shared fixtures: the real ``guardproxy serve`` and ``guardproxy mock-upstream`` as subprocesses.

``mock_upstream`` is one scripted model per test module; ``make_proxy(policies=..., config=...)``
writes a config and policy files to a temp folder and starts ``guardproxy serve`` on a free
loopback port in front of the mock. Tests drive the proxy with the official ``openai`` SDK.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SUPPORT_KEY = "sk-test-support"
PLAY_KEY = "sk-test-playground"
ADMIN_KEY = "sk-test-admin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"process exited early ({proc.returncode}):\n{out}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


# 8 nested alias levels, 10 aliases each: 10**8 nodes once expanded, a few hundred bytes as text.
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [" + ", ".join([f"*{p}"] * 10) + "]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True))

MEMORY_CAP = 1024**3  # 1 GiB of address space: expanding a policy bomb needs many times that


def cap_memory() -> None:
    """``preexec_fn`` for a child whose bounds are under test: a bound that fails cannot eat the machine."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Mock:
    url: str  # base URL with /v1
    root: str
    proc: subprocess.Popen[bytes]

    def script(self, *replies: dict[str, Any]) -> None:
        httpx.post(f"{self.root}/_mock/script", json={"replies": list(replies)}, timeout=5).raise_for_status()

    def reset(self) -> None:
        httpx.post(f"{self.root}/_mock/reset", timeout=5).raise_for_status()

    def calls(self) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = httpx.get(f"{self.root}/_mock/calls", timeout=5).json()["calls"]
        return calls


@pytest.fixture(scope="module")
def mock_upstream() -> Iterator[Mock]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "mock-upstream", "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    _wait_http(f"{root}/healthz", proc)
    yield Mock(f"{root}/v1", root, proc)
    _stop(proc)


@dataclass
class Proxy:
    url: str  # base URL with /v1
    root: str
    proc: subprocess.Popen[bytes]
    dir: Path
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def client(self, key: str = SUPPORT_KEY, **kw: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, **kw)

    def aclient(self, key: str = SUPPORT_KEY, **kw: Any) -> Any:
        import openai

        return openai.AsyncOpenAI(base_url=self.url, api_key=key, max_retries=0, **kw)

    def post(self, path: str, key: str = SUPPORT_KEY, **kw: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}", **kw.pop("headers", {})}
        return httpx.post(self.root + path, headers=headers, timeout=30, **kw)

    def get(self, path: str, key: str | None = SUPPORT_KEY) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.get(self.root + path, headers=headers, timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def audit_lines(self) -> list[dict[str, Any]]:
        """Every line of the proxy's audit log (``telemetry.audit_log: audit.log`` in the default config)."""
        path = self.dir / "audit.log"
        text = path.read_text() if path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line]

    def audit_for(self, decision_id: str, timeout: float = 15.0) -> dict[str, Any]:
        """The audit line of one decision; streams write theirs once settled, just after the last byte."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.audit_lines():
                if line.get("decision_id") == decision_id:
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no audit line for {decision_id}")
            time.sleep(0.05)

    def stream_bytes(self, body: dict[str, Any], key: str = SUPPORT_KEY) -> bytes:
        """POST a streamed chat request and return every byte of the answer."""
        with httpx.stream("POST", self.root + "/v1/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {key}"}, json={**body, "stream": True}) as r:
            return b"".join(r.iter_bytes())


REDIS_TEST_DB = "redis://127.0.0.1:6379/12"  # live tests that take both backends; never flushed


def store_for(backend: str) -> str:
    """The ``store:`` URL for a parametrised backend (``memory`` or ``redis``); a missing Redis fails."""
    if backend == "memory":
        return "memory"
    import redis

    assert redis.Redis.from_url(REDIS_TEST_DB).ping()
    return REDIS_TEST_DB


def default_config(mock_url: str, port: int, store: str = "memory") -> dict[str, Any]:
    route = {"api_base": mock_url, "api_key": "sk-upstream-secret-not-for-clients"}
    return {
        "server": {"host": "127.0.0.1", "port": port, "watch_interval_s": 0.2},
        "policies": ["policies/"],
        "store": store,
        "models": [
            {"name": "gpt-4o-mini", "upstream": "openai/gpt-4o-mini", **route},
            {"name": "gpt-4o", "upstream": "openai/gpt-4o", **route},
            {"name": "gpt-4.1", "upstream": "openai/gpt-4.1", **route},
        ],
        "keys": [
            {"id": "support-agent", "key": SUPPORT_KEY, "team": "support"},
            {"id": "playground", "key": PLAY_KEY, "team": "sandbox"},
        ],
        "admin_keys": [ADMIN_KEY],
        "telemetry": {"audit_log": "audit.log"},
    }


# The playground (team sandbox) may never be handed the word SWORDFISH, in any field of any answer.
SANDBOX_GUARD = """apiVersion: guardproxy/v1
kind: Policy
metadata: {name: sandbox-guard}
match: {teams: [sandbox]}
output:
  deny_patterns:
    - {id: no-secret-word, regex: 'SWORDFISH', reason: the secret word never leaves}
"""


def shipped_policies() -> dict[str, str]:
    return {p.name: p.read_text() for p in (ROOT / "policies").glob("*.yaml")}


@pytest.fixture(scope="module")
def make_proxy(mock_upstream: Mock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Proxy]]:
    started: list[Proxy] = []

    def start(policies: dict[str, str] | None = None, config: dict[str, Any] | None = None,
              env: dict[str, str] | None = None, store: str = "memory", capped: bool = False) -> Proxy:
        """``capped``: the serve process's address space is capped (``cap_memory``)."""
        d = tmp_path_factory.mktemp("proxy")
        (d / "policies").mkdir()
        for name, text in (shipped_policies() if policies is None else policies).items():
            (d / "policies" / name).write_text(text)
        port = free_port()
        cfg = config if config is not None else default_config(mock_upstream.url, port, store)
        cfg.setdefault("server", {})["port"] = port
        (d / "guardproxy.yaml").write_text(yaml.safe_dump(cfg))
        log = d / "serve.log"
        penv = {**os.environ, **(env or {})}
        with log.open("wb") as fh:
            cmd = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(d / "guardproxy.yaml")]
            proc = subprocess.Popen(cmd, cwd=d, stdout=fh, stderr=subprocess.STDOUT, env=penv,
                                    preexec_fn=cap_memory if capped else None)
        root = f"http://127.0.0.1:{port}"
        _wait_http(f"{root}/healthz", proc)
        p = Proxy(f"{root}/v1", root, proc, d, log)
        started.append(p)
        return p

    yield start
    for p in started:
        _stop(p.proc)


@pytest.fixture(scope="module")
def proxy(make_proxy: Callable[..., Proxy]) -> Proxy:
    """guardproxy with the shipped policies (support-agent + org-base) on the memory store."""
    return make_proxy()
