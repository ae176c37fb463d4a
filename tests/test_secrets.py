"""No secret leaves the proxy: not in logs, audit lines, metrics, error bodies or spans.

A live ``guardproxy serve`` is configured with sentinel strings as the upstream API key, the
caller's key and the admin key; a bad request carries another sentinel in ``Authorization``. The
test forces the error paths (401, 403, 404, upstream 401/500 -> 502 with the SDK retrying, a
stream failing midway, idempotent replays) and then greps every output the proxy produced (its
stdout/stderr including the console span exporter, the audit log, ``/metrics``, every response
body and header seen by the client, and the raw OTLP protobuf received) for the sentinels.
Prompt text must not appear in spans or the audit log either (``capture_content`` is off).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import Mock, Proxy, free_port
from otlp_receiver import OtlpReceiver

UPSTREAM_SECRET = "sk-upstream-SENTINEL-4c1d9e"
CALLER_SECRET = "sk-caller-SENTINEL-77ab02"
ADMIN_SECRET = "sk-admin-SENTINEL-0f3e55"
BAD_SECRET = "sk-bad-SENTINEL-9a9a11"
SECRETS = (UPSTREAM_SECRET, CALLER_SECRET, ADMIN_SECRET, BAD_SECRET)
PROMPT = "PROMPT-SENTINEL-3be1 my account password is hunter2"
# Also the bare tails, so a partly masked or truncated echo of a key is caught as well.
SENTINEL_PARTS = ("SENTINEL-4c1d9e", "SENTINEL-77ab02", "SENTINEL-0f3e55", "SENTINEL-9a9a11",
                  "PROMPT-SENTINEL")

# A policy for the caller: any tool allowed but delete_*, lookup's arguments schema-checked, free text.
OPEN = """
apiVersion: guardproxy/v1
kind: Policy
metadata: {name: open}
match: {all: true}
tools:
  default: allow
  deny: ["delete_*"]
  allow:
    lookup:
      schema: {type: object, properties: {q: {type: number}}}
"""


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


def _config(mock_url: str, exporter: dict[str, Any]) -> dict[str, Any]:
    route = {"api_base": mock_url, "api_key": UPSTREAM_SECRET}
    return {
        "server": {"host": "127.0.0.1", "port": free_port(), "watch_policies": False},
        "policies": ["policies/"],
        "models": [{"name": "gpt-4o-mini", "upstream": "openai/gpt-4o-mini", **route}],
        "keys": [{"id": "caller", "key": CALLER_SECRET, "team": "t1"}],
        "admin_keys": [ADMIN_SECRET],
        "telemetry": {"audit_log": "audit.log", **exporter},
    }


class Transcript:
    """Everything the client saw: bodies and headers of every response."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.seen: list[str] = []

    def request(self, method: str, path: str, key: str | None, **kw: Any) -> httpx.Response:
        headers = {**({"authorization": f"Bearer {key}"} if key else {}), **kw.pop("headers", {})}
        resp = httpx.request(method, self.proxy.root + path, headers=headers, timeout=30, **kw)
        self.seen.append(resp.text)
        self.seen.append(json.dumps(dict(resp.headers)))
        return resp

    def chat(self, key: str | None = CALLER_SECRET, **kw: Any) -> httpx.Response:
        body = {"model": "gpt-4o-mini", "max_tokens": 64, "messages": [{"role": "user", "content": PROMPT}]}
        body.update(kw.pop("body", {}))
        return self.request("POST", "/v1/chat/completions", key, json=body, **kw)


def _drive(t: Transcript, mock: Mock) -> None:
    mock.reset()
    # happy paths: chat, a tool call, a stream, admin and info routes
    mock.script({"content": "fine", "usage": {"prompt_tokens": 9, "completion_tokens": 2}},
                {"tool_calls": [{"name": "search", "arguments": json.dumps({"q": PROMPT})}]})
    first = t.chat()
    assert first.status_code == 200
    assert t.chat().status_code == 200
    mock.script({"content": "streamed answer", "chunk_chars": 4})
    assert t.chat(body={"stream": True}).status_code == 200
    for path in ("/v1/models", "/v1/spend", "/readyz"):
        assert t.request("GET", path, CALLER_SECRET).status_code == 200
    assert t.request("GET", "/admin/approvals", ADMIN_SECRET).status_code == 200
    assert t.request("GET", "/v1/spend", ADMIN_SECRET).status_code == 200
    assert t.request("POST", "/v1/feedback", CALLER_SECRET,
                     json={"decision_id": first.headers["x-guardproxy-decision-id"],
                           "outcome": "overridden"}).status_code == 200

    # 401 with a wrong key in Authorization, on every kind of route
    assert t.chat(BAD_SECRET).status_code == 401
    assert t.chat(None, headers={"authorization": BAD_SECRET}).status_code == 401  # no "Bearer"
    for method, path in (("GET", "/v1/models"), ("GET", "/v1/spend"), ("POST", "/v1/feedback"),
                         ("GET", "/admin/approvals"), ("POST", "/admin/reload")):
        assert t.request(method, path, BAD_SECRET, json={}).status_code in (401, 403), path
    assert t.request("GET", "/admin/approvals", CALLER_SECRET).status_code == 403
    # 404s: an unknown route (with a bad key too), an unknown model, an unknown approval
    assert t.request("GET", "/v1/nope", BAD_SECRET).status_code == 404
    assert t.chat(body={"model": "gpt-nope"}).status_code == 404
    assert t.request("POST", "/admin/approvals/apr_nope/approve", ADMIN_SECRET).status_code == 404
    # bad JSON, policy denial
    assert t.request("POST", "/v1/chat/completions", CALLER_SECRET, content=b"{" + PROMPT.encode(),
                     headers={"content-type": "application/json"}).status_code == 400
    mock.script({"tool_calls": [{"name": "delete_everything", "arguments": "{}"}]})
    assert t.chat().status_code == 200
    # arguments that fail their schema, twice (the repair fails too): errors are recorded, values masked
    mock.script(*[{"tool_calls": [{"name": "lookup", "arguments": json.dumps({"q": PROMPT})}]}] * 2)
    denied = t.chat()
    assert denied.status_code == 200 and "schema_denied:lookup" in denied.headers["x-guardproxy-actions"]
    # upstream errors, one of them echoing the upstream key back (as real providers do)
    mock.script({"status": 401, "error_message": f"Incorrect API key provided: {UPSTREAM_SECRET}",
                 "error_type": "invalid_request_error"})
    resp = t.chat()
    assert resp.status_code == 502 and "HTTP 401" in resp.json()["error"]["message"]
    mock.script({"status": 500, "error_message": f"boom for key {UPSTREAM_SECRET}"})
    assert t.chat(body={"stream": True}).status_code == 502
    mock.script(*[{"status": 500, "error_message": f"retry me {UPSTREAM_SECRET}"}] * 3)
    # the SDK retries 5xx: 3 attempts, all 502
    sdk = openai.OpenAI(base_url=t.proxy.url, api_key=CALLER_SECRET, max_retries=2)
    with pytest.raises(openai.APIStatusError) as exc:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}])
    assert exc.value.status_code == 502
    t.seen.append(str(exc.value.body) + str(exc.value))
    # a stream that breaks midway: an SSE error event
    mock.script({"content": "a long answer that breaks", "chunk_chars": 3, "stream_fail_after": 2})
    broken = t.chat(body={"stream": True})
    assert broken.status_code == 200 and '"error"' in broken.text
    # idempotent replay
    mock.script({"content": "once"})
    first = t.chat(headers={"idempotency-key": "k1"})
    again = t.chat(headers={"idempotency-key": "k1"})
    assert first.status_code == again.status_code == 200
    assert again.headers.get("idempotent-replayed") == "true"


def _assert_clean(where: str, text: str, forbidden: tuple[str, ...] = SENTINEL_PARTS) -> None:
    found = [s for s in forbidden if s in text]
    assert not found, f"{where} leaks {found}"


@pytest.mark.parametrize("exporter", ["console", "otlp"])
def test_no_secret_or_prompt_in_any_output(exporter: str, make_proxy: Callable[..., Proxy],
                                           mock_upstream: Mock, receiver: OtlpReceiver) -> None:
    tel = {"exporter": "otlp", "endpoint": f"http://127.0.0.1:{receiver.port}"} if exporter == "otlp" \
        else {"exporter": "console"}
    proxy = make_proxy(policies={"open.yaml": OPEN}, config=_config(mock_upstream.url, tel))
    t = Transcript(proxy)
    _drive(t, mock_upstream)
    metrics = t.request("GET", "/metrics", None)
    assert metrics.status_code == 200 and "guardproxy_requests_total" in metrics.text
    _assert_clean("/metrics", metrics.text)
    # The upstream did get its key (so the sentinel was really in play) and never the caller's.
    calls = mock_upstream.calls()
    assert calls and all(c["headers"]["authorization"] == f"Bearer {UPSTREAM_SECRET}" for c in calls)
    _assert_clean("upstream requests", json.dumps([c["headers"] for c in calls]), (CALLER_SECRET, BAD_SECRET))
    # Stop the proxy: the batch span processor flushes on shutdown, the console exporter has written.
    proxy.proc.terminate()
    proxy.proc.wait(15)

    log = proxy.output()
    audit = (proxy.dir / "audit.log").read_text()
    lines = [json.loads(x) for x in audit.splitlines()]
    assert len(lines) >= 10 and any(x.get("error_code") == "upstream_error" for x in lines)
    assert any(e.startswith("lookup: ") for x in lines for e in x.get("errors") or ())
    if exporter == "console":
        assert '"name": "chat gpt-4o-mini"' in log  # the spans are really in the log being checked
        spans = log
    else:
        raw = receiver.data()
        assert b"chat gpt-4o-mini" in raw and b"policy.response" in raw
        spans = raw.decode("utf-8", "replace")
    _assert_clean("serve log", log)
    _assert_clean("audit log", audit)
    _assert_clean("spans", spans)
    # Responses may echo the prompt (the mock repeats it); they must never carry a key.
    for i, seen in enumerate(t.seen):
        _assert_clean(f"response #{i}", seen, SECRETS)
