"""The HTTP edge, through the real server: slow clients, malformed requests, paths and methods.

Every answer the proxy itself makes is the JSON error envelope, including the ones the HTTP server
writes before (or instead of) the app: parser-level 400s, the 500 for a request cut off at shutdown,
the 408 for a client that never finishes its request. Raw sockets send what the SDK cannot.
"""

from __future__ import annotations

import contextlib
import json
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from conftest import PLAY_KEY, SUPPORT_KEY, Mock, Proxy, default_config, free_port

# Small enough to keep the suite quick, large enough that a loaded CI box answers the other requests
# of a test well inside it (the tests assert ordering, never durations).
TIMEOUT_S = 3.0
WAIT_S = 60.0  # socket read bound: generous, a failing test hits it, a passing one never does
REDIS11 = "redis://127.0.0.1:6379/11"  # --workers needs a shared store; nothing here writes state to it
AUTH = f"Authorization: Bearer {SUPPORT_KEY}\r\n".encode()
# the playground key's policies do not inspect the mock's text: its chat requests succeed
PLAY_AUTH = f"Authorization: Bearer {PLAY_KEY}\r\n".encode()
HI = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def _post(headers: bytes = b"", auth: bytes = AUTH) -> bytes:
    """The start of a raw ``POST /v1/chat/completions``: request line, Host, auth, ``headers``."""
    return b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth + headers


def _chat(body: dict[str, Any], headers: bytes = b"") -> bytes:
    """A whole raw chat request from the playground key."""
    raw = json.dumps(body).encode()
    return _post(headers + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(raw), PLAY_AUTH) + raw


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        assert self.headers.get("content-type") == "application/json", self.headers
        doc = json.loads(self.body)
        assert set(doc) == {"error"} and {"message", "type", "code", "param"} <= set(doc["error"]), doc
        return dict(doc["error"])


def _connect(to: Proxy | int) -> socket.socket:
    """A raw connection to a proxy, or to a port."""
    s = socket.create_connection(("127.0.0.1", to if isinstance(to, int) else int(to.root.rsplit(":", 1)[1])))
    s.settimeout(WAIT_S)
    return s


def _read_reply(s: socket.socket) -> Reply:
    """One HTTP/1.1 response with a Content-Length body (what every proxy error is)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before a response: {buf!r}"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = s.recv(65536)
        assert chunk, "connection closed inside the response body"
        rest += chunk
    return Reply(status, headers, rest[:length])


def _closed(s: socket.socket) -> bool:
    """True when the server closed the connection (EOF or reset) within WAIT_S."""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _pending(s: socket.socket) -> bool:
    """Has the server written anything (or closed) on ``s`` yet? Never waits."""
    return bool(select.select([s], [], [], 0)[0])


def _assert_408_and_closed(s: socket.socket) -> None:
    reply = _read_reply(s)
    assert reply.status == 408 and reply.error()["code"] == "body_timeout"
    assert reply.headers.get("connection") == "close"
    assert _closed(s)


def _exchange_and_close(to: Proxy | int, data: bytes) -> tuple[Reply, bool]:
    """Send ``data``, read one reply; also whether the server then closed the connection."""
    with _connect(to) as s:
        s.sendall(data)
        reply = _read_reply(s)
        return reply, _closed(s)


@pytest.fixture(scope="module")
def edge(make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> Proxy:
    cfg = default_config(mock_upstream.url, 0)
    cfg["server"]["body_read_timeout_s"] = TIMEOUT_S
    return make_proxy(config=cfg)


@pytest.fixture(autouse=True)
def _fresh(mock_upstream: Mock) -> None:
    mock_upstream.reset()


# --- slow clients -------------------------------------------------------------------------------


def test_slow_body_gets_408_envelope_while_other_connections_are_served(edge: Proxy) -> None:
    with _connect(edge) as slow:
        slow.sendall(_post(b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"model\": \"gpt"))
        # the server is not stuck on the slow client: other connections are answered meanwhile
        assert edge.get("/healthz", key=None).json() == {"status": "ok"}
        assert edge.get("/v1/models").status_code == 200
        assert not _pending(slow), "the slow request was answered before the others"
        _assert_408_and_closed(slow)


def test_slow_headers_get_408_envelope_and_close(edge: Proxy) -> None:
    with _connect(edge) as slow:
        slow.sendall(_post())
        assert edge.get("/healthz", key=None).status_code == 200
        assert not _pending(slow)
        _assert_408_and_closed(slow)


def test_body_trickled_after_an_early_refusal_does_not_hold_the_connection(edge: Proxy) -> None:
    """The app answers 401 without reading the body; a client that keeps trickling it is cut off."""
    with _connect(edge) as s:
        s.sendall(_post(b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{",
                        auth=b"Authorization: Bearer nope\r\n"))
        reply = _read_reply(s)
        assert reply.status == 401 and reply.error()["code"] == "invalid_api_key"
        s.settimeout(TIMEOUT_S / 6)
        closed = False
        for _ in range(int(WAIT_S * 6 / TIMEOUT_S)):  # a byte per read timeout: far slower than a real client
            with contextlib.suppress(TimeoutError):
                closed = s.recv(65536) == b""
            if closed:
                break
            try:
                s.sendall(b" ")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed, "the server kept a trickling client's connection open"


def test_idle_connection_is_closed_while_a_prompt_keep_alive_client_is_served(
        edge: Proxy, mock_upstream: Mock) -> None:
    req = _chat(HI)
    with _connect(edge) as idle, _connect(edge) as s:
        # a normal client, request in two pieces, two requests on one connection: untouched by the bounds
        s.sendall(req[:-10])
        s.sendall(req[-10:])
        first = _read_reply(s)
        s.sendall(req)
        second = _read_reply(s)
        assert first.status == second.status == 200
        assert len(mock_upstream.calls()) == 2
        # a connection that never sends a request does not stay open
        assert not _pending(idle)
        assert _closed(idle)


# --- malformed requests: the HTTP parser's own 400 ----------------------------------------------

MALFORMED = {
    "negative_content_length": _post(b"Content-Length: -5\r\n\r\n{}"),
    "garbage_content_length": _post(b"Content-Length: 1e3\r\n\r\n{}"),
    "two_content_lengths": _post(b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}"),
    "malformed_request_line": b"GET /v1/models HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    "not_http": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",  # a TLS ClientHello on the plain port
    "bad_chunk_size": _post(b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"),
    "chunked_and_content_length": _post(b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
    "space_in_header_name": b"GET /healthz HTTP/1.1\r\nHo st: x\r\n\r\n",
    "non_ascii_path": b"GET /v1/mod\xffels HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_request_gets_400_envelope_and_close(edge: Proxy, name: str) -> None:
    reply, closed = _exchange_and_close(edge, MALFORMED[name])
    assert reply.status == 400
    err = reply.error()
    assert err["code"] == "invalid_request" and err["type"] == "invalid_request_error"
    assert reply.headers.get("connection") == "close"
    assert closed


def test_bad_chunk_after_headers_gets_400_envelope(edge: Proxy) -> None:
    """The parser fails while the app is already waiting for the body: one envelope, nothing after it."""
    with _connect(edge) as s:
        s.sendall(_post(b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n"))
        assert edge.get("/healthz", key=None).status_code == 200
        s.sendall(b"not-hex\r\n")
        reply = _read_reply(s)
        assert reply.status == 400 and reply.error()["code"] == "invalid_request"
        assert _closed(s)


def test_parser_error_during_a_streamed_response_does_not_splice_a_400_into_it(
        edge: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "abcdefgh" * 8, "chunk_chars": 4, "chunk_delay_ms": 100})
    with _connect(edge) as s:
        s.sendall(_chat({**HI, "stream": True}))
        got = b""
        while b"data:" not in got:  # the stream is under way
            chunk = s.recv(65536)
            assert chunk
            got += chunk
        s.sendall(b"GARBAGE\r\n\r\n")
        while chunk := s.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 200 ")
    assert b"HTTP/1.1 400" not in got and b"invalid HTTP request" not in got


# --- paths and methods ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions/", "/chat/completions/", "/v1/models/", "/healthz/",
                                  "/admin/approvals/apr_1/approve/"])
def test_trailing_slash_is_404_envelope_not_a_redirect(edge: Proxy, path: str) -> None:
    method = "GET" if path in ("/v1/models/", "/healthz/") else "POST"
    r = httpx.request(method, edge.root + path, headers={"authorization": f"Bearer {SUPPORT_KEY}"},
                      json=HI if method == "POST" else None, follow_redirects=False, timeout=30)
    assert r.status_code == 404, (r.status_code, r.headers)
    assert "location" not in r.headers
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("GET", "/v1/chat/completions", "POST"),
    ("PUT", "/chat/completions", "POST"),
    ("DELETE", "/v1/models", "GET, HEAD"),
    ("OPTIONS", "/v1/feedback", "POST"),
    ("HEAD", "/v1/chat/completions", "POST"),  # the envelope's headers, no body
])
def test_wrong_method_is_405_envelope_with_allow(edge: Proxy, method: str, path: str, allow: str) -> None:
    r = httpx.request(method, edge.root + path, headers={"authorization": f"Bearer {SUPPORT_KEY}"}, timeout=30)
    assert r.status_code == 405
    assert r.headers["content-type"] == "application/json"
    assert r.content == b"" if method == "HEAD" else r.json()["error"]["code"] == "invalid_request"
    assert sorted(a.strip() for a in r.headers["allow"].split(",")) == sorted(allow.split(", "))


def test_upgrade_request_is_served_as_http_and_closes_its_connection(edge: Proxy) -> None:
    """No WebSockets: the request is answered as HTTP/1.1. The parser stops at an Upgrade request's
    headers, so the connection cannot carry another request: it says so and closes, dropping none silently."""
    with _connect(edge) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                  b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                  b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = _read_reply(s)
        assert reply.status == 401 and reply.error()["code"] == "invalid_api_key"
        assert reply.headers.get("connection") == "close"
        assert _closed(s)


def test_upgrade_request_with_a_body_is_refused_not_read_as_empty(edge: Proxy, mock_upstream: Mock) -> None:
    """What ``curl --http2`` sends on http://: the parser would drop the body after the headers."""
    reply, closed = _exchange_and_close(edge, _chat(HI, b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                                                        b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"))
    assert reply.status == 400
    err = reply.error()
    assert err["code"] == "invalid_request" and "Upgrade" in err["message"]
    assert closed
    assert mock_upstream.calls() == []


# --- depth ---------------------------------------------------------------------------------------


def _nested(depth: int) -> Any:
    v: Any = "x"
    for _ in range(depth):
        v = [v]
    return v


def test_body_nested_deeper_than_max_body_depth_is_invalid_json(edge: Proxy, mock_upstream: Mock) -> None:
    # the body, messages and messages[0] are 3 levels; the default server.max_body_depth is 64
    ok = {**HI, "messages": [{**HI["messages"][0], "metadata": _nested(61)}]}
    deep = {**HI, "messages": [{**HI["messages"][0], "metadata": _nested(62)}]}
    assert edge.post("/v1/chat/completions", key=PLAY_KEY, json=ok).status_code == 200
    r = edge.post("/v1/chat/completions", key=PLAY_KEY, json=deep)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"
    assert "64" in r.json()["error"]["message"]
    assert len(mock_upstream.calls()) == 1


# --- what the HTTP server writes when the app cannot answer --------------------------------------


def test_request_cut_off_at_shutdown_gets_500_envelope(make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> None:
    p = make_proxy(config=default_config(mock_upstream.url, 0))
    mock_upstream.script({"content": "late", "delay_ms": 60_000})
    with _connect(p) as s:
        s.sendall(_chat(HI))
        for _ in range(300):  # until the upstream holds the request
            if mock_upstream.calls():
                break
            time.sleep(0.05)
        assert mock_upstream.calls()
        p.proc.send_signal(signal.SIGTERM)  # graceful shutdown gives up on the request after its grace period
        reply = _read_reply(s)
    p.proc.wait(30)
    assert reply.status == 500
    assert reply.error()["code"] == "internal_error"


def test_workers_serve_the_same_edge(make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> None:
    """``--workers N`` runs the same protocol in every worker (it is handed to spawned processes)."""
    cfg = default_config(mock_upstream.url, 0, store=REDIS11)
    cfg["server"].update({"workers": 2, "body_read_timeout_s": TIMEOUT_S})
    p = make_proxy(config=cfg)
    reply, closed = _exchange_and_close(p, MALFORMED["negative_content_length"])
    assert reply.status == 400 and reply.error()["code"] == "invalid_request" and closed
    with _connect(p) as slow:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        _assert_408_and_closed(slow)
    r = httpx.post(p.root + "/v1/chat/completions/", headers={"authorization": f"Bearer {SUPPORT_KEY}"},
                   json={}, follow_redirects=False, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# --- the protocol class on its own: what guardproxy serve cannot be configured to do ------------


@pytest.fixture
def served() -> Iterator[Callable[..., int]]:
    """Run an ASGI app under uvicorn with guardproxy's protocol class, in a thread; returns its port."""
    from proxy.httpserver import http_protocol

    running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(app: Any, **kw: Any) -> int:
        port = free_port()
        cfg = uvicorn.Config(app, host="127.0.0.1", port=port, http=http_protocol(TIMEOUT_S), ws="none",
                             lifespan="off", log_config=None, timeout_graceful_shutdown=1, **kw)
        server = uvicorn.Server(cfg)
        t = threading.Thread(target=server.run, daemon=True)
        t.start()
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        assert server.started
        running.append((server, t))
        return port

    yield start
    for server, t in running:
        server.should_exit = True
        t.join(10)


async def _waits_for_disconnect(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def test_concurrency_limit_answer_is_503_envelope(served: Callable[..., int]) -> None:
    port = served(_waits_for_disconnect, limit_concurrency=2)
    with _connect(port) as busy:
        busy.sendall(b"POST /hold HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        reply, closed = _exchange_and_close(port, b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.status == 503 and reply.error()["code"] == "state_unavailable" and closed
