"""guardproxy mock-upstream, driven as a real process with the official openai SDK."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema_rs
import openai
import pytest

from proxy._mock_http import Request
from proxy._mock_replies import DEFAULT_PREFIX
from proxy.mock_upstream import CALL_LOG_LIMIT, MockControl, MockUpstream, start

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "from proxy.mock_upstream import run; run('127.0.0.1', 0)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("mock-upstream listening on http://127.0.0.1:")
        assert line.rstrip().endswith("(scripted model, not a real LLM)")
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        yield f"http://127.0.0.1:{port}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def mock(base_url: str) -> MockControl:
    control = MockControl(base_url)
    control.reset()
    return control


@pytest.fixture
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0) as c:
        yield c


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def test_plain_completion_echoes_last_user_message_model_and_counts_usage(
    mock: MockControl, client: openai.OpenAI
) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "hello mock " + "x" * 300},
    ]
    r = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    expected = DEFAULT_PREFIX + ("hello mock " + "x" * 300)[:200]
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == "gpt-4o-mini"
    choice = r.choices[0]
    assert (choice.index, choice.finish_reason, choice.logprobs) == (0, "stop", None)
    assert choice.message.role == "assistant"
    assert choice.message.content == expected
    assert choice.message.tool_calls is None
    prompt_chars = sum(len(m["content"]) for m in messages)
    assert r.usage is not None
    assert r.usage.prompt_tokens == prompt_chars // 4 + 1
    assert r.usage.completion_tokens == len(expected) // 4 + 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_repeated_identical_requests_get_fresh_ids(mock: MockControl, client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="gpt-4o", messages=user("same"))
    second = client.chat.completions.create(model="gpt-4o", messages=user("same"))
    assert first.id != second.id
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.created > 1_600_000_000


def test_stream_with_include_usage(mock: MockControl, client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o",
            messages=user("stream me please"),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == DEFAULT_PREFIX + "stream me please"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2
    finish = chunks[-2]
    assert finish.choices[0].finish_reason == "stop"
    assert finish.choices[0].delta.content is None and finish.choices[0].delta.tool_calls is None
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == len(text) // 4 + 1
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(mock: MockControl, client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=user("hi"), stream=True))
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


PARALLEL = {
    "content": None,
    "tool_calls": [
        {"name": "get_weather", "arguments": '{"city": "Paris"}', "id": "call_fixed"},
        {"name": "send_email", "arguments": '{"to": "a@b.c", broken'},
    ],
}


def test_scripted_parallel_tool_calls(mock: MockControl, client: openai.OpenAI) -> None:
    mock.script(PARALLEL)
    r = client.chat.completions.create(model="gpt-4o", messages=user("weather?"))
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 2
    assert calls[0].id == "call_fixed"
    assert calls[1].id.startswith("call_") and calls[1].id != calls[0].id
    assert [c.type for c in calls] == ["function", "function"]
    assert [(c.function.name, c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        ("get_weather", '{"city": "Paris"}'),
        ("send_email", '{"to": "a@b.c", broken'),
    ]


def test_scripted_parallel_tool_calls_streamed_like_openai(mock: MockControl, client: openai.OpenAI) -> None:
    mock.script(PARALLEL)
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=user("weather?"), stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    by_index: dict[int, list[Any]] = {0: [], 1: []}
    for d in deltas:
        by_index[d.index].append(d)
    for index, expected in enumerate(PARALLEL["tool_calls"]):  # type: ignore[arg-type]
        opening, *fragments = by_index[index]
        assert opening.type == "function" and opening.id
        assert opening.function.name == expected["name"]
        assert opening.function.arguments == ""
        assert 2 <= len(fragments) <= 3
        assert all(f.id is None and f.function.name is None for f in fragments)
        assert "".join(f.function.arguments for f in fragments) == expected["arguments"]
    assert by_index[0][0].id == "call_fixed"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_legacy_functions_get_function_call(mock: MockControl, client: openai.OpenAI) -> None:
    functions: list[Any] = [{"name": "lookup", "parameters": {"type": "object", "properties": {}}}]
    mock.script({"tool_calls": [{"name": "lookup", "arguments": '{"q": "x"}'}]})
    r = client.chat.completions.create(model="gpt-4o", messages=user("find"), functions=functions)
    choice = r.choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.tool_calls is None
    assert choice.message.function_call is not None
    assert (choice.message.function_call.name, choice.message.function_call.arguments) == (
        "lookup",
        '{"q": "x"}',
    )

    mock.script({"tool_calls": [{"name": "lookup", "arguments": '{"q": "streamed"}'}]})
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o", messages=user("find"), functions=functions, stream=True
        )
    )
    calls = [c.choices[0].delta.function_call for c in chunks if c.choices[0].delta.function_call]
    assert calls[0].name == "lookup" and calls[0].arguments == ""
    assert "".join(c.arguments or "" for c in calls) == '{"q": "streamed"}'
    assert chunks[-1].choices[0].finish_reason == "function_call"


def test_scripted_error_status_then_queue_continues(mock: MockControl, client: openai.OpenAI) -> None:
    mock.script(
        {"status": 503, "error_message": "upstream on fire"}, {"content": "recovered"}, {"status": 500}
    )
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="gpt-4o", messages=user("a"))
    assert info.value.status_code == 503
    assert info.value.body == {
        "message": "upstream on fire",
        "type": "server_error",
        "code": None,
        "param": None,
    }
    r = client.chat.completions.create(model="gpt-4o", messages=user("b"))
    assert r.choices[0].message.content == "recovered"
    with pytest.raises(openai.InternalServerError) as info2:
        client.chat.completions.create(model="gpt-4o", messages=user("c"), stream=True)
    assert "scripted error" in str(info2.value)
    r = client.chat.completions.create(model="gpt-4o", messages=user("d"))
    assert r.choices[0].message.content == DEFAULT_PREFIX + "d"


def test_call_log_records_path_headers_and_body(mock: MockControl, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="gpt-4o", messages=user("one"), extra_headers={"X-Trace-Id": "t-1"})
    client.chat.completions.create(model="gpt-4o-mini", messages=user("two"), temperature=0.5)
    calls = mock.calls()
    assert [c["path"] for c in calls] == [CHAT, CHAT]
    assert calls[0]["headers"]["x-trace-id"] == "t-1"
    assert calls[0]["headers"]["authorization"] == "Bearer x"
    assert calls[0]["body"] == {"model": "gpt-4o", "messages": user("one")}
    assert calls[1]["body"] == {"model": "gpt-4o-mini", "messages": user("two"), "temperature": 0.5}
    assert mock.stats()["chat_requests"] == 2


def test_reset_clears_queue_log_and_counter(mock: MockControl, client: openai.OpenAI) -> None:
    mock.script({"content": "never used"})
    client.models.list()
    mock.reset()
    assert mock.calls() == []
    assert mock.stats()["chat_requests"] == 0
    r = client.chat.completions.create(model="gpt-4o", messages=user("fresh"))
    assert r.choices[0].message.content == DEFAULT_PREFIX + "fresh"


def test_keep_alive_serves_many_requests_on_one_socket(base_url: str, mock: MockControl) -> None:
    port = int(base_url.rsplit(":", 1)[1])
    body = json.dumps({"model": "gpt-4o", "messages": user("ka")}).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        for _ in range(200):
            sock.sendall(request)
            status, headers, payload = _read_response(reader)
            assert status == 200
            assert headers.get("connection") != "close"
            assert json.loads(payload)["choices"][0]["message"]["content"] == DEFAULT_PREFIX + "ka"
    assert mock.stats()["chat_requests"] == 200


def test_keep_alive_with_the_sdk(mock: MockControl, client: openai.OpenAI) -> None:
    for i in range(100):
        r = client.chat.completions.create(model="gpt-4o", messages=user(f"n{i}"))
        assert r.choices[0].message.content == DEFAULT_PREFIX + f"n{i}"
    assert mock.stats()["chat_requests"] == 100


def test_pipelined_requests_answer_in_order_behind_a_delayed_reply(base_url: str, mock: MockControl) -> None:
    mock.script({"content": "slow", "delay_ms": 50}, {"content": "fast"})
    port = int(base_url.rsplit(":", 1)[1])
    payloads = [json.dumps({"model": "gpt-4o", "messages": user(t)}).encode() for t in ("a", "b", "c")]
    wire = b"".join(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(p), p)
        for p in payloads
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(wire + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = sock.makefile("rb")
        bodies = [json.loads(_read_response(reader)[2]) for _ in range(4)]
    contents = [b["choices"][0]["message"]["content"] for b in bodies[:3]]
    assert contents == ["slow", "fast", DEFAULT_PREFIX + "c"]
    assert bodies[3] == {"ok": True}


def test_chunked_request_body_is_accepted(base_url: str, mock: MockControl) -> None:
    port = int(base_url.rsplit(":", 1)[1])
    body = json.dumps({"model": "gpt-4o", "messages": user("chunky")}).encode()
    half = len(body) // 2
    wire = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, body[:half], len(body) - half, body[half:])
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(wire)
        status, _, payload = _read_response(sock.makefile("rb"))
    assert status == 200
    assert json.loads(payload)["choices"][0]["message"]["content"] == DEFAULT_PREFIX + "chunky"
    assert mock.calls()[0]["body"] == {"model": "gpt-4o", "messages": user("chunky")}


def test_stream_fail_after_cuts_the_connection(mock: MockControl, client: openai.OpenAI) -> None:
    mock.script({"content": "a" * 100, "stream_fail_after": 3})
    received = []
    with pytest.raises((httpx.HTTPError, openai.APIError)):
        for chunk in client.chat.completions.create(model="gpt-4o", messages=user("x"), stream=True):
            received.append(chunk)
    assert len(received) == 3
    assert all(c.choices[0].finish_reason is None for c in received)


def test_chunk_delay_and_delay_still_deliver_the_whole_stream(
    mock: MockControl, client: openai.OpenAI
) -> None:
    mock.script({"content": "paced reply", "chunk_delay_ms": 5, "delay_ms": 5, "chunk_chars": 3})
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=user("x"), stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert pieces == ["pac", "ed ", "rep", "ly"]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_usage_and_model_overrides(mock: MockControl, client: openai.OpenAI) -> None:
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 20,
        "prompt_tokens_details": {"cached_tokens": 800},
        "completion_tokens_details": {"reasoning_tokens": 7},
    }
    mock.script({"content": "x", "usage": usage, "model": "gpt-4o-2024-08-06", "finish_reason": "length"})
    r = client.chat.completions.create(model="gpt-4o", messages=user("x"))
    assert r.model == "gpt-4o-2024-08-06"
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (1000, 20, 1020)
    assert r.usage.prompt_tokens_details is not None and r.usage.prompt_tokens_details.cached_tokens == 800
    details = r.usage.completion_tokens_details
    assert details is not None and details.reasoning_tokens == 7


def test_demo_tool_call_from_user_text(mock: MockControl, client: openai.OpenAI) -> None:
    tools: list[Any] = [
        {"type": "function", "function": {"name": "apply_credit", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "credit", "parameters": {"type": "object"}}},
    ]
    r = client.chat.completions.create(
        model="gpt-4o", messages=user('please apply_credit {"amount": 75} now'), tools=tools
    )
    calls = r.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1
    assert (calls[0].function.name, calls[0].function.arguments) == ("apply_credit", '{"amount": 75}')  # type: ignore[union-attr]
    assert r.choices[0].finish_reason == "tool_calls"
    plain = client.chat.completions.create(model="gpt-4o", messages=user("apply_credit please"), tools=tools)
    assert plain.choices[0].message.content == DEFAULT_PREFIX + "apply_credit please"


def test_json_schema_response_format_gets_conforming_json(mock: MockControl, client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "score": {"type": "integer", "minimum": 3},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "kind": {"enum": ["a", "b"]},
        },
        "required": ["name", "score", "tags", "kind"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model="gpt-4o",
        messages=user("give json"),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "out", "schema": schema, "strict": True},
        },
    )
    content = r.choices[0].message.content
    assert content is not None
    assert jsonschema_rs.validator_for(schema).is_valid(json.loads(content))


def test_models_health_and_unknown_routes(base_url: str, mock: MockControl, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="my-custom-model", messages=user("x"))
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids[:2] == ["gpt-4o", "gpt-4o-mini"] and "my-custom-model" in ids
    assert {m.owned_by for m in models.data} == {"guardproxy-mock"}
    assert httpx.get(base_url + "/healthz").json() == {"ok": True}
    assert httpx.get(base_url + "/nope").status_code == 404
    assert httpx.get(base_url + CHAT).status_code == 405


def test_bad_script_and_bad_json_are_400(base_url: str, mock: MockControl) -> None:
    bad = httpx.post(base_url + "/_mock/script", json={"replies": [{"contnet": "typo"}]})
    assert bad.status_code == 400 and "contnet" in bad.json()["error"]["message"]
    assert httpx.post(base_url + CHAT, content=b"{not json").status_code == 400
    assert mock.calls()[0]["body"] == "{not json"


def test_in_process_start_with_async_sdk() -> None:
    async def scenario() -> tuple[str | None, int]:
        app = MockUpstream()
        server, port = await start("127.0.0.1", 0, app=app)
        try:
            async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x") as c:
                r = await c.chat.completions.create(model="gpt-4o", messages=user("in-process"))
            return r.choices[0].message.content, app.chat_requests
        finally:
            server.close()
            app.close_connections()
            await server.wait_closed()

    content, count = asyncio.run(scenario())
    assert content == DEFAULT_PREFIX + "in-process"
    assert count == 1


def _read_response(reader: Any) -> tuple[int, dict[str, str], bytes]:
    status = int(reader.readline().split()[1])
    headers: dict[str, str] = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, reader.read(int(headers["content-length"]))


def test_call_log_is_capped_at_the_most_recent_entries() -> None:
    app = MockUpstream()
    total = CALL_LOG_LIMIT + 5
    for i in range(total):
        body = json.dumps({"model": "gpt-4o", "messages": user(str(i))}).encode()
        app.handle(Request(b"POST", CHAT.encode(), [], body))
    assert app.chat_requests == total
    assert len(app.calls) == CALL_LOG_LIMIT
    assert json.loads(app.calls[0][2])["messages"] == user("5")
