"""Redis goes away mid-run and comes back: fail-closed answers 503 meanwhile, and the proxy recovers by itself.

Uses a private ``redis-server`` on a free port (the shared one at 6379 is never stopped).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis
from conftest import PLAY_KEY, Mock, Proxy, default_config, free_port, shipped_policies

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")


def _start_redis(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if redis.Redis(port=port, socket_timeout=0.5).ping():
                return proc
        except redis.RedisError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("private redis-server did not start")


@pytest.fixture(scope="module")
def redis_port() -> Iterator[int]:
    port = free_port()
    proc = _start_redis(port)
    yield port
    proc.terminate()  # already gone after the test shuts it down; harmless then
    proc.wait(5)


def _ask(p: Proxy) -> httpx.Response:
    return p.post("/v1/chat/completions", key=PLAY_KEY,
                  json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


def test_store_outage_fails_closed_then_recovers(make_proxy: Callable[..., Proxy], mock_upstream: Mock,
                                                 redis_port: int) -> None:
    cfg = default_config(mock_upstream.url, free_port(), f"redis://127.0.0.1:{redis_port}/0")
    p = make_proxy(policies=shipped_policies(), config=cfg)
    assert _ask(p).status_code == 200

    redis.Redis(port=redis_port).shutdown(nosave=True)
    down = _ask(p)
    assert down.status_code == 503
    assert down.json()["error"]["code"] == "state_unavailable"
    assert p.get("/readyz").status_code == 503

    proc = _start_redis(redis_port)
    try:
        deadline = time.monotonic() + 15
        statuses = []
        while time.monotonic() < deadline:
            r = _ask(p)
            statuses.append(r.status_code)
            if r.status_code == 200:
                break
            time.sleep(0.2)
        assert statuses[-1] == 200, statuses
        assert set(statuses) <= {200, 503}  # never a 500 on the way back
        assert p.get("/readyz").status_code == 200
        assert "Traceback" not in p.output()
    finally:
        proc.terminate()
        proc.wait(5)
