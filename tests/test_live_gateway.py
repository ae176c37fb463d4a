"""Live-server tests of the gateway core: the OpenAI-compatible proxy itself.

The real ``guardproxy serve`` runs in front of ``guardproxy mock-upstream`` and is driven with the
official ``openai`` SDK (sync and async) and, where the raw bytes matter, with ``httpx``. Free-text
cases use PLAY_KEY (org-base only): SUPPORT_KEY pins a TicketAction output schema.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from conftest import ADMIN_KEY, PLAY_KEY, SUPPORT_KEY, Mock, Proxy, default_config, free_port

UPSTREAM_KEY = "sk-upstream-secret-not-for-clients"
USER = [{"role": "user", "content": "hello"}]
ENVELOPE_KEYS = {"message", "type", "code", "param", "decision_id"}


def _tool(name: str, props: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": props or {"q": {"type": "string"}}}}}


def _error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The error envelope of ``resp``, after checking status, code and the envelope keys."""
    assert resp.status_code == status, resp.text
    err: dict[str, Any] = resp.json()["error"]
    assert set(err) >= ENVELOPE_KEYS, err
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    return err


@pytest.fixture(scope="module")
def small(make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> Proxy:
    """A proxy with a 2 KiB body limit and a 0.5 s upstream timeout."""
    cfg = default_config(mock_upstream.url, free_port())
    cfg["server"].update({"max_body_bytes": 2048, "upstream_timeout_s": 0.5})
    return make_proxy(config=cfg)


@pytest.fixture(autouse=True)
def _fresh_mock(mock_upstream: Mock) -> None:
    mock_upstream.reset()


# --- plain chat -------------------------------------------------------------------------------------


def test_plain_chat_sync(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "plain answer", "usage": {"prompt_tokens": 20, "completion_tokens": 5}})
    raw = proxy.client(PLAY_KEY).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=USER)
    resp = raw.parse()
    assert resp.choices[0].message.content == "plain answer"
    assert resp.choices[0].finish_reason == "stop"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (20, 5, 25)
    h = raw.headers
    assert h["x-guardproxy-decision-id"].startswith("dec_")
    assert h["x-guardproxy-policy-revision"] == proxy.get("/readyz").json()["policy_revision"]
    assert h["x-guardproxy-model"] == "gpt-4o-mini"
    # 20 x $0.15/M + 5 x $0.60/M = 6 µ$
    assert h["x-guardproxy-cost-usd"] == "0.000006"
    assert h["x-guardproxy-conversation-id"].startswith("auto-")


def test_plain_chat_async(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "async answer", "usage": {"prompt_tokens": 7, "completion_tokens": 2}})

    async def go() -> Any:
        async with proxy.aclient(PLAY_KEY) as client:
            return await client.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=USER, extra_headers={"x-guardproxy-conversation-id": "conv-async-1"})

    raw = asyncio.run(go())
    resp = raw.parse()
    assert resp.choices[0].message.content == "async answer"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (7, 2)
    assert raw.headers["x-guardproxy-model"] == "gpt-4o"
    assert raw.headers["x-guardproxy-conversation-id"] == "conv-async-1"
    assert raw.headers["x-guardproxy-decision-id"].startswith("dec_")


def test_caller_key_is_never_forwarded_upstream(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "ok"})
    proxy.client(PLAY_KEY).chat.completions.create(model="gpt-4o-mini", messages=USER)
    call = mock_upstream.calls()[-1]
    assert call["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert PLAY_KEY not in json.dumps(call)


# --- streaming --------------------------------------------------------------------------------------


def test_stream_with_include_usage_sync(proxy: Proxy, mock_upstream: Mock) -> None:
    text = "streamed words arrive in several small chunks"
    mock_upstream.script({"content": text, "chunk_chars": 5, "usage": {"prompt_tokens": 9, "completion_tokens": 8}})
    chunks = list(proxy.client(PLAY_KEY).chat.completions.create(
        model="gpt-4o-mini", messages=USER, stream=True, stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and not chunks[-1].choices
    assert (usage[0].prompt_tokens, usage[0].completion_tokens) == (9, 8)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_stream_without_include_usage_hides_usage_but_asks_upstream(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "no usage for you", "chunk_chars": 4})

    async def go() -> list[Any]:
        async with proxy.aclient(PLAY_KEY) as client:
            stream = await client.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True)
            return [c async for c in stream]

    chunks = asyncio.run(go())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "no usage for you"
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    assert mock_upstream.calls()[-1]["body"]["stream_options"]["include_usage"] is True


# --- tool calls -------------------------------------------------------------------------------------


def test_single_tool_call_sync(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"tool_calls": [{"name": "lookup_weather", "arguments": '{"q": "Oslo"}'}]})
    resp = proxy.client(PLAY_KEY).chat.completions.create(
        model="gpt-4o-mini", messages=USER, tools=[_tool("lookup_weather")])
    calls = resp.choices[0].message.tool_calls
    assert resp.choices[0].finish_reason == "tool_calls"
    assert len(calls) == 1
    assert calls[0].function.name == "lookup_weather"
    assert json.loads(calls[0].function.arguments) == {"q": "Oslo"}
    assert calls[0].id


def test_parallel_tool_calls_async(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"tool_calls": [{"name": "lookup_weather", "arguments": '{"q": "Oslo"}'},
                                         {"name": "search_docs", "arguments": '{"q": "refunds"}'}]})

    async def go() -> Any:
        async with proxy.aclient(PLAY_KEY) as client:
            return await client.chat.completions.create(
                model="gpt-4o-mini", messages=USER, tools=[_tool("lookup_weather"), _tool("search_docs")])

    resp = asyncio.run(go())
    calls = resp.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("lookup_weather", {"q": "Oslo"}), ("search_docs", {"q": "refunds"})]
    assert len({c.id for c in calls}) == 2
    assert resp.choices[0].finish_reason == "tool_calls"


def test_parallel_tool_calls_streamed(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"tool_calls": [{"name": "lookup_weather", "arguments": '{"q": "Oslo"}'},
                                         {"name": "search_docs", "arguments": '{"q": "refunds"}'}]})
    chunks = list(proxy.client(PLAY_KEY).chat.completions.create(
        model="gpt-4o-mini", messages=USER, tools=[_tool("lookup_weather"), _tool("search_docs")], stream=True))
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for td in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            slot = calls.setdefault(td.index, {"name": "", "args": ""})
            slot["name"] += td.function.name or ""
            slot["args"] += td.function.arguments or ""
    assert [(v["name"], json.loads(v["args"])) for _, v in sorted(calls.items())] == [
        ("lookup_weather", {"q": "Oslo"}), ("search_docs", {"q": "refunds"})]


def test_legacy_functions_and_function_call(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"tool_calls": [{"name": "lookup_weather", "arguments": '{"q": "Bergen"}'}]})
    fn = _tool("lookup_weather")["function"]
    resp = proxy.post("/v1/chat/completions", key=PLAY_KEY, json={
        "model": "gpt-4o-mini", "messages": USER, "functions": [fn], "function_call": {"name": "lookup_weather"}})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"]["name"] == "lookup_weather"
    assert json.loads(choice["message"]["function_call"]["arguments"]) == {"q": "Bergen"}
    sent = mock_upstream.calls()[-1]["body"]
    assert sent["functions"][0]["name"] == "lookup_weather"
    assert sent["function_call"] == {"name": "lookup_weather"}


def test_denied_tool_call_is_removed_under_play_key(proxy: Proxy, mock_upstream: Mock) -> None:
    """org-base forbids delete_*: the declared tool is stripped and a call to it never reaches the client."""
    mock_upstream.script({"tool_calls": [{"name": "delete_account", "arguments": '{"q": "x"}'}]})
    resp = proxy.client(PLAY_KEY).chat.completions.create(
        model="gpt-4o-mini", messages=USER, tools=[_tool("lookup_weather"), _tool("delete_account")])
    assert not resp.choices[0].message.tool_calls
    sent = mock_upstream.calls()[-1]["body"]
    assert [t["function"]["name"] for t in sent["tools"]] == ["lookup_weather"]


# --- response_format: json_schema -------------------------------------------------------------------

_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": {
    "type": "object", "required": ["city", "population"], "additionalProperties": False,
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}}}}}


def test_json_schema_valid_output_passes(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": '{"city": "Oslo", "population": 709000}'})
    resp = proxy.client(PLAY_KEY).chat.completions.create(
        model="gpt-4o-mini", messages=USER, response_format=_SCHEMA_FORMAT)
    assert json.loads(resp.choices[0].message.content or "") == {"city": "Oslo", "population": 709000}
    assert len(mock_upstream.calls()) == 1


def test_json_schema_invalid_output_is_repaired(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "Oslo has about 709k people", "usage": {"prompt_tokens": 10,
                                                                              "completion_tokens": 6}},
                         {"content": '{"city": "Oslo", "population": 709000}',
                          "usage": {"prompt_tokens": 30, "completion_tokens": 9}})
    raw = proxy.client(PLAY_KEY).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=USER, response_format=_SCHEMA_FORMAT)
    resp = raw.parse()
    assert json.loads(resp.choices[0].message.content or "") == {"city": "Oslo", "population": 709000}
    calls = mock_upstream.calls()
    assert len(calls) == 2  # one repair round trip
    # the repair call tells the model what was wrong
    assert len(calls[1]["body"]["messages"]) > len(calls[0]["body"]["messages"])
    assert "repaired:output" in raw.headers["x-guardproxy-actions"]
    # both attempts are real calls: usage is summed
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (40, 15)


def test_json_schema_invalid_output_twice_is_422(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "not json"}, {"content": '{"city": "Oslo"}'})
    resp = proxy.post("/v1/chat/completions", key=PLAY_KEY, json={
        "model": "gpt-4o-mini", "messages": USER, "response_format": _SCHEMA_FORMAT})
    err = _error(resp, 422, "schema_validation_failed")
    assert err["decision_id"] == resp.headers["x-guardproxy-decision-id"]
    assert len(mock_upstream.calls()) == 2


# --- models, health, identity -----------------------------------------------------------------------


def test_models_lists_only_allowed(proxy: Proxy) -> None:
    ids = {m.id for m in proxy.client(PLAY_KEY).models.list()}
    assert ids == {"gpt-4o-mini", "gpt-4o"}
    assert "gpt-4.1" not in ids


def test_models_needs_a_key(proxy: Proxy) -> None:
    _error(proxy.get("/v1/models", key="sk-nope"), 401, "invalid_api_key")


def test_healthz_and_readyz(proxy: Proxy) -> None:
    assert proxy.get("/healthz", key=None).status_code == 200
    r = proxy.get("/readyz", key=None)
    assert r.status_code == 200
    doc = r.json()
    assert doc["status"] == "ready"
    assert isinstance(doc["policy_revision"], str) and doc["policy_revision"]
    assert doc["store"]["reachable"] is True
    assert set(doc["policies"]) == {"org-base", "support-agent"}


def test_identity_ignores_user_field_and_team_header(proxy: Proxy, mock_upstream: Mock) -> None:
    """Claiming the support agent's identity in the body or headers does not apply its policy."""
    mock_upstream.script({"content": "hi"})
    raw = proxy.post("/v1/chat/completions", key=PLAY_KEY, headers={"x-team": "support", "x-user": "support-agent"},
                     json={"model": "gpt-4o-mini", "messages": USER, "user": "support-agent", "temperature": 0.9,
                           "tools": [_tool("lookup_weather")]})
    assert raw.status_code == 200, raw.text
    sent = mock_upstream.calls()[-1]["body"]
    assert sent["temperature"] == 0.9  # support-agent would clamp to 0.2
    assert [t["function"]["name"] for t in sent["tools"]] == ["lookup_weather"]  # support-agent would strip it
    # ... and the other way round: a support key claiming the sandbox team is still clamped
    mock_upstream.script({"content": '{"action": "resolve", "reason": "r", "confidence": 0.9, '
                                     '"requires_human_review": false}'})
    raw = proxy.post("/v1/chat/completions", key=SUPPORT_KEY, headers={"x-team": "sandbox"},
                     json={"model": "gpt-4o-mini", "messages": USER, "user": "playground", "temperature": 0.9})
    assert raw.status_code == 200, raw.text
    assert mock_upstream.calls()[-1]["body"]["temperature"] == 0.2


# --- bad input --------------------------------------------------------------------------------------


def test_invalid_json_is_400(proxy: Proxy) -> None:
    resp = proxy.post("/v1/chat/completions", key=PLAY_KEY, content=b'{"model": "gpt-4o-mini",',
                      headers={"content-type": "application/json"})
    _error(resp, 400, "invalid_json")


def test_duplicate_json_keys_are_400(proxy: Proxy, mock_upstream: Mock) -> None:
    body = b'{"model": "gpt-4o-mini", "model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}'
    resp = proxy.post("/v1/chat/completions", key=PLAY_KEY, content=body,
                      headers={"content-type": "application/json"})
    err = _error(resp, 400, "invalid_json")
    assert "duplicate" in err["message"].lower()
    assert mock_upstream.calls() == []


@pytest.mark.parametrize(("patch", "param"), [
    ({"model": 4}, "model"),
    ({"messages": {"role": "user", "content": "hi"}}, "messages"),
    ({"stream": "yes"}, "stream"),
])
def test_wrong_types_are_400_with_param(proxy: Proxy, patch: dict[str, Any], param: str) -> None:
    body = {"model": "gpt-4o-mini", "messages": USER, **patch}
    err = _error(proxy.post("/v1/chat/completions", key=PLAY_KEY, json=body), 400, "invalid_request")
    assert err["param"] == param


def test_wrong_type_through_the_sdk_raises_bad_request(proxy: Proxy) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        proxy.client(PLAY_KEY).chat.completions.create(model="gpt-4o-mini", messages=USER,
                                                       extra_body={"stream": "yes"})
    assert info.value.code == "invalid_request"
    assert info.value.param == "stream"


def test_body_over_limit_is_413(small: Proxy, mock_upstream: Mock) -> None:
    big = [{"role": "user", "content": "x" * 4096}]
    err = _error(small.post("/v1/chat/completions", key=PLAY_KEY, json={"model": "gpt-4o-mini", "messages": big}),
                 413, "request_too_large")
    assert "2048" in err["message"]
    # also without a Content-Length header (chunked upload): the limit is enforced while reading
    payload = json.dumps({"model": "gpt-4o-mini", "messages": big}).encode()
    resp = small.post("/v1/chat/completions", key=PLAY_KEY, content=iter([payload[:1000], payload[1000:]]),
                      headers={"content-type": "application/json"})
    _error(resp, 413, "request_too_large")
    assert mock_upstream.calls() == []


def test_unknown_model_is_404(proxy: Proxy) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        proxy.client(PLAY_KEY).chat.completions.create(model="gpt-9-ultra", messages=USER)
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    _error(proxy.post("/v1/chat/completions", key=PLAY_KEY, json={"model": "gpt-9-ultra", "messages": USER}),
           404, "model_not_found")


def test_configured_but_disallowed_model_is_403(proxy: Proxy) -> None:
    _error(proxy.post("/v1/chat/completions", key=PLAY_KEY, json={"model": "gpt-4.1", "messages": USER}),
           403, "model_not_allowed")


def test_unknown_key_is_401_openai_shape(proxy: Proxy, mock_upstream: Mock) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        proxy.client("sk-not-a-key").chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    err = _error(proxy.post("/v1/chat/completions", key="sk-not-a-key",
                            json={"model": "gpt-4o-mini", "messages": USER}), 401, "invalid_api_key")
    assert err["type"] == "authentication_error"
    assert "sk-not-a-key" not in err["message"]
    # the admin key is not a chat key either
    _error(proxy.post("/v1/chat/completions", key=ADMIN_KEY, json={"model": "gpt-4o-mini", "messages": USER}),
           401, "invalid_api_key")
    assert mock_upstream.calls() == []


# --- upstream failures ------------------------------------------------------------------------------


def test_upstream_500_is_502(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"status": 500, "error_message": "model melted"})
    with pytest.raises(openai.APIStatusError) as info:
        proxy.client(PLAY_KEY).chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert info.value.status_code == 502
    assert info.value.code == "upstream_error"
    mock_upstream.script({"status": 500, "error_message": "model melted"})
    err = _error(proxy.post("/v1/chat/completions", key=PLAY_KEY, json={"model": "gpt-4o-mini", "messages": USER}),
                 502, "upstream_error")
    assert "500" in err["message"]
    assert UPSTREAM_KEY not in err["message"]


def test_upstream_500_on_stream_is_502(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"status": 500})
    resp = proxy.post("/v1/chat/completions", key=PLAY_KEY,
                      json={"model": "gpt-4o-mini", "messages": USER, "stream": True})
    err = _error(resp, 502, "upstream_error")
    assert "500" in err["message"]


def test_upstream_timeout_is_504(small: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "too late", "delay_ms": 3000})
    err = _error(small.post("/v1/chat/completions", key=PLAY_KEY, json={"model": "gpt-4o-mini", "messages": USER}),
                 504, "upstream_timeout")
    assert err["type"] == "upstream_error"


def test_stream_failing_midway_ends_with_sse_error(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "this answer will break off halfway through", "chunk_chars": 4,
                          "stream_fail_after": 2})
    body = {"model": "gpt-4o-mini", "messages": USER, "stream": True}
    with httpx.stream("POST", proxy.url + "/chat/completions", json=body, timeout=30,
                      headers={"authorization": f"Bearer {PLAY_KEY}"}) as resp:
        assert resp.status_code == 200  # the stream had started
        raw = b"".join(resp.iter_bytes())
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    assert b'"code":"upstream_error"' in events[-1]
    assert b"[DONE]" not in raw
    last = json.loads(events[-1].removeprefix(b"data: "))["error"]
    assert set(last) >= ENVELOPE_KEYS
    assert last["decision_id"] == resp.headers["x-guardproxy-decision-id"]
    # the text that did arrive is a prefix of the scripted answer
    text = "".join(json.loads(e.removeprefix(b"data: "))["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1])
    assert text and "this answer will break off halfway through".startswith(text)
    mock_upstream.script({"content": "this answer will break off halfway through", "chunk_chars": 4,
                          "stream_fail_after": 2})
    with pytest.raises(openai.APIError):
        for _ in proxy.client(PLAY_KEY).chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True):
            pass


def test_still_healthy_after_everything(proxy: Proxy, small: Proxy, mock_upstream: Mock) -> None:
    for p in (proxy, small):
        assert p.get("/healthz", key=None).status_code == 200
        assert p.proc.poll() is None
    mock_upstream.script({"content": "still here"})
    resp = proxy.client(PLAY_KEY).chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert resp.choices[0].message.content == "still here"
