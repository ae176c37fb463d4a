"""Streams end when their client does (live server).

A client that disconnects (FIN or RST) or stops reading for ``server.stream_write_timeout_s`` ends its
relay at once: the upstream request is closed (the model stops generating), the request is charged for
what the upstream produced until then (reasoning and audio text included), and no buffer outlives it.
What is held for inspection is bounded (``output_too_large``).
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
import yaml
from conftest import ADMIN_KEY, PLAY_KEY, Mock, Proxy, default_config, free_port, shipped_policies

CONV = "x-guardproxy-conversation-id"
GUARD = yaml.safe_dump({"apiVersion": "guardproxy/v1", "kind": "Policy", "metadata": {"name": "guarded"},
                        "match": {"keys": ["guarded"]},
                        "output": {"deny_patterns": [{"id": "no-secret", "regex": "SWORDFISH"}]}})
GUARDED_KEY = "sk-stream-guarded"


@pytest.fixture(scope="module")
def gp(make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> Proxy:
    cfg = default_config(mock_upstream.url, free_port())
    cfg["server"].update({"upstream_pool_size": 2, "stream_write_timeout_s": 1, "max_stream_buffer_bytes": 20_000})
    cfg["keys"].append({"id": "guarded", "key": GUARDED_KEY})
    return make_proxy(policies={**shipped_policies(), "guarded.yaml": GUARD}, config=cfg)


@pytest.fixture(autouse=True)
def _fresh(mock_upstream: Mock) -> None:
    mock_upstream.reset()


def _stats(mock: Mock) -> dict[str, Any]:
    return dict(httpx.get(mock.root + "/_mock/stats", timeout=5).json()["streams"])


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _spend(gp: Proxy, conv: str) -> float:
    rows = gp.get(f"/v1/spend?prefix=conversation:playground/{conv}", key=ADMIN_KEY).json()["data"]
    return sum(float(r["spend_usd"]) for r in rows)


def _raw_request(gp: Proxy, body: dict[str, Any], conv: str, key: str = PLAY_KEY) -> socket.socket:
    payload = orjson.dumps(body)
    port = int(gp.root.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              + f"authorization: Bearer {key}\r\n{CONV}: {conv}\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
              + payload)
    return s


def _drained(s: socket.socket) -> bool:
    """Read until the peer ends the connection (EOF or reset); False if it is still open after 20 s."""
    s.settimeout(20)
    try:
        while s.recv(1 << 20):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


LONG = {"content": "word " * 40_000, "chunk_chars": 20, "chunk_delay_ms": 1}  # 10,000 paced events


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_client_that_leaves_stops_the_upstream_stream(gp: Proxy, mock_upstream: Mock, how: str) -> None:
    conv = f"leave-{uuid.uuid4().hex[:8]}"
    mock_upstream.script(LONG)
    s = _raw_request(gp, {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "go"}]},
                     conv)
    got = b""
    while len(got) < 20_000:
        chunk = s.recv(65536)
        assert chunk
        got += chunk
    if how == "reset":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    _wait(lambda: _stats(mock_upstream)["abandoned"] == 1, "the upstream stream to be closed")
    stats = _stats(mock_upstream)
    assert stats["completed"] == 0 and stats["events_sent"] < 9_000  # the model stopped well before the end
    # charged for what was read (a few thousand tokens at most), far below the whole 40,000-word answer
    _wait(lambda: _spend(gp, conv) > 0, "the abandoned stream to be settled")
    assert _spend(gp, conv) < 40_000 * 0.6e-6
    head = got.split(b"\r\n\r\n", 1)[0].decode()
    decision = next(line.split(":", 1)[1].strip() for line in head.split("\r\n")
                    if line.lower().startswith("x-guardproxy-decision-id:"))
    assert "client_disconnected" in gp.audit_for(decision)["actions"]


def test_a_client_that_leaves_an_unpaced_stream_is_charged_for_what_was_read(gp: Proxy, mock_upstream: Mock) -> None:
    """The upstream sends everything at once (a fast provider): the proxy must still stop at the disconnect
    rather than read (and bill) the rest of a 600,000-token answer."""
    conv = f"unpaced-{uuid.uuid4().hex[:8]}"
    mock_upstream.script({"content": "word " * 600_000, "chunk_chars": 50,
                          "usage": {"prompt_tokens": 5, "completion_tokens": 600_000}})
    s = _raw_request(gp, {"model": "gpt-4o-mini", "stream": True, "max_tokens": 600_000,
                          "messages": [{"role": "user", "content": "go"}]}, conv)
    got = b""
    while len(got) < 20_000:
        chunk = s.recv(65536)
        assert chunk
        got += chunk
    s.close()
    _wait(lambda: _spend(gp, conv) > 0, "the abandoned stream to be settled")
    assert _spend(gp, conv) < 600_000 * 0.6e-6 / 2  # far less than the whole answer's $0.36


def test_clients_that_stop_reading_are_cut_and_release_the_upstream_pool(gp: Proxy, mock_upstream: Mock) -> None:
    """upstream_pool_size is 2: two clients that read nothing must not stall everyone else."""
    big = {"content": "x" * 24_000_000, "chunk_chars": 65536}  # far more than the sockets can buffer
    mock_upstream.script(big, big, {"content": "answered"})
    stalled = [_raw_request(gp, {"model": "gpt-4o-mini", "stream": True,
                                 "messages": [{"role": "user", "content": f"s{i}"}]}, f"stall-{i}-{uuid.uuid4().hex}")
               for i in range(2)]
    try:
        time.sleep(0.5)  # both streams are running and their clients read nothing
        r = httpx.post(gp.url + "/chat/completions", timeout=30, headers={"authorization": f"Bearer {PLAY_KEY}"},
                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "me"}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "answered"
        _wait(lambda: (gp.dir / "audit.log").read_text().count('"client_timeout"') == 2,
              "both stalled streams to be cut and recorded")
        for s in stalled:  # the proxy dropped them: what was buffered can be read, then the connection ends
            assert _drained(s)
        assert "without completing response" not in gp.output()
    finally:
        for s in stalled:
            s.close()


def test_streamed_reasoning_is_charged_when_the_client_leaves(gp: Proxy, mock_upstream: Mock) -> None:
    conv = f"reason-{uuid.uuid4().hex[:8]}"
    reasoning = [{"reasoning_content": "think " * 200}] * 300  # ~1200 chars a delta
    mock_upstream.script({"content": "answer", "raw_deltas": reasoning, "chunk_delay_ms": 2})
    got, seen = b"", 0
    with httpx.stream("POST", gp.url + "/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {PLAY_KEY}", CONV: conv},
                      json={"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
        for line in r.iter_lines():
            if "reasoning_content" in line:
                seen += 1
                if seen == 20:
                    break
    del got
    _wait(lambda: _spend(gp, conv) > 0, "the stream to be settled")
    # at least the 20 reasoning deltas the client saw (20 x 200 tokens) at gpt-4o's $10/M output price
    assert _spend(gp, conv) >= 20 * 200 * 10e-6


def test_held_output_is_bounded(gp: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "y" * 30_000, "chunk_chars": 100})
    with httpx.stream("POST", gp.url + "/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {GUARDED_KEY}"},
                      json={"model": "gpt-4o-mini", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as r:
        raw = b"".join(r.iter_bytes())
    assert b'"code":"output_too_large"' in raw and b"yyyy" not in raw


def test_a_healthy_reader_gets_the_whole_stream(gp: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "word " * 2000, "chunk_chars": 50})
    done = threading.Event()
    with httpx.stream("POST", gp.url + "/chat/completions", timeout=30, headers={"authorization": f"Bearer {PLAY_KEY}"},
                      json={"model": "gpt-4o-mini", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as r:
        text = ""
        for line in r.iter_lines():
            if line.startswith("data: {"):
                doc = orjson.loads(line[6:])
                for ch in doc.get("choices") or ():
                    text += (ch.get("delta") or {}).get("content") or ""
            if line == "data: [DONE]":
                done.set()
    assert done.is_set() and text == "word " * 2000
