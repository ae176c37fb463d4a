"""Hostile request schemas through the live server: none of them may stall the event loop.

A request's tool ``parameters`` and ``response_format`` schemas are untrusted: they are compiled with the
linear-time regex engine, under size, depth, pattern and ``$ref``-expansion caps checked before compiling,
and under a per-request compile budget, with the event loop free between compiles. The stall tests prove
"free" by ordering, never by time: ``/healthz`` is polled from the moment the hostile body has been sent
until the hostile response arrives, and must have answered several times in between (a blocked loop
answers it at most once, after the hostile request is done).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from conftest import ADMIN_KEY, PLAY_KEY, Mock, Proxy

# A blocked loop serves a /healthz poll only after the hostile request has finished, so it can never
# produce more than one answer "in flight"; three leave room for a poll racing the hostile response.
IN_FLIGHT_ANSWERS = 3


@pytest.fixture(scope="module")
def gp(make_proxy: Callable[..., Proxy]) -> Proxy:
    return make_proxy()  # shipped policies: the playground key's tools are allowed, schemas are declared


@pytest.fixture(autouse=True)
def _fresh(mock_upstream: Mock) -> None:
    mock_upstream.reset()


def _tag() -> str:
    # Distinct schemas per test run: the proxy's schema cache must not make a test's request cheap.
    return uuid.uuid4().hex[:8]


def _tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def _string_tool(name: str, pattern_or_schema: str | dict[str, Any]) -> dict[str, Any]:
    prop = {"type": "string", "pattern": pattern_or_schema} if isinstance(pattern_or_schema, str) \
        else pattern_or_schema
    return _tool(name, {"type": "object", "properties": {"text": prop}, "required": ["text"]})


def _body(conversation: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **extra}


def _post(p: Proxy, body: dict[str, Any], conversation: str = "") -> httpx.Response:
    headers = {"x-guardproxy-conversation-id": conversation} if conversation else {}
    return p.post("/v1/chat/completions", key=PLAY_KEY, json=body, headers=headers)


def _error(r: httpx.Response) -> tuple[int, str, str | None]:
    err = r.json()["error"]
    return r.status_code, err["code"], err.get("param")


def _nothing_spent(p: Proxy, conversation: str) -> bool:
    rows = p.get(f"/v1/spend?prefix=conversation:playground/{conversation}", key=ADMIN_KEY).json()["data"]
    return rows == []


def _race(p: Proxy, body: dict[str, Any]) -> tuple[int, httpx.Response]:
    """Send ``body`` from a thread and poll ``/healthz`` from the moment its last byte is written.

    Returns how many ``/healthz`` answers arrived while the hostile request was still in flight, and the
    hostile response.
    """
    data = orjson.dumps(body)
    sent, done = threading.Event(), threading.Event()
    result: dict[str, Any] = {}

    def content() -> Iterator[bytes]:
        yield data
        sent.set()  # runs when the client asks for the next chunk: the whole body has been written

    def hostile() -> None:
        try:
            headers = {"authorization": f"Bearer {PLAY_KEY}", "content-type": "application/json",
                       "content-length": str(len(data))}
            result["response"] = httpx.post(p.root + "/v1/chat/completions", content=content(), headers=headers,
                                            timeout=300)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread below
            result["error"] = exc
        finally:
            sent.set()
            done.set()

    answered = 0
    with httpx.Client(base_url=p.root, timeout=300) as client:
        assert client.get("/healthz").status_code == 200  # connected beforehand: polls reuse the connection
        thread = threading.Thread(target=hostile)
        thread.start()
        assert sent.wait(60)
        while not done.is_set():
            assert client.get("/healthz").status_code == 200
            if not done.is_set():
                answered += 1
    thread.join()
    if "error" in result:
        raise result["error"]
    return answered, result["response"]


# --- the event loop stays free ------------------------------------------------------------------


def test_healthz_answers_while_100_distinct_pattern_tools_compile(gp: Proxy, mock_upstream: Mock) -> None:
    # Each pattern is distinct (no cache hit) and costly to compile (a Unicode class repeated); before the
    # fix all 100 compiled back to back on the event loop.
    tag = _tag()
    tools = [_string_tool(f"lookup_{i}", rf"^\p{{L}}{{5}}{tag}{i}$") for i in range(100)]
    answered, r = _race(gp, _body(tools=tools))
    assert answered >= IN_FLIGHT_ANSWERS
    # Compiled within the request's budget (200), or refused when the budget ran out first (400).
    assert r.status_code == 200 or _error(r) == (400, "schema_too_complex", "tools")


@pytest.mark.parametrize(("branches", "code", "says"), [(120, "schema_too_complex", "regular expressions"),
                                                        (60, "invalid_request", "backreferences")])
def test_backtracking_pattern_with_a_backreference_is_refused_before_upstream(
        gp: Proxy, mock_upstream: Mock, branches: int, code: str, says: str) -> None:
    # The issue's schema: anyOf branches of a backtracking pattern. Before the fix it compiled, and the
    # model's argument then took the backtracking engine seconds per turn (twice, with the repair turn), all
    # on the event loop. Now 120 patterns are over the per-schema count, and 60 are refused by the
    # linear-time engine, which has no backreferences.
    tag = _tag()
    anyof = [{"type": "string", "pattern": rf"^(\w+\s?)+\1-{tag}-{i}$"} for i in range(branches)]
    mock_upstream.script(*[{"tool_calls": [{"name": "summarize", "arguments": orjson.dumps(
        {"text": "word " * 30 + "!"}).decode()}]}] * 2)
    conversation = f"backref-{tag}"
    r = _post(gp, _body(tools=[_string_tool("summarize", {"anyOf": anyof})]), conversation)
    assert _error(r) == (400, code, "tools")
    message = r.json()["error"]["message"]
    assert "summarize" in message and says in message
    assert mock_upstream.calls() == []
    assert _nothing_spent(gp, conversation)


def test_pattern_exponential_under_backtracking_is_validated_without_stalling(gp: Proxy,
                                                                             mock_upstream: Mock) -> None:
    # ^(a+)+$ compiles in the linear-time engine; against "aaaa…!" a backtracking engine takes exponential
    # time. The model sends that argument, the proxy rejects it and asks for a repair; the repair turn is
    # slow upstream, and /healthz must answer meanwhile: validating the hostile argument left the loop free.
    tag = _tag()
    branches = [{"type": "string", "pattern": f"^(a+)+{tag}{i}$"} for i in range(60)]
    hostile_args = orjson.dumps({"text": "a" * 20_000 + "!"}).decode()
    mock_upstream.script({"tool_calls": [{"name": "echo", "arguments": hostile_args}]},
                         {"tool_calls": [{"name": "echo", "arguments": orjson.dumps({"text": f"aa{tag}7"}).decode()}],
                          "delay_ms": 1500})
    answered, r = _race(gp, _body(tools=[_string_tool("echo", {"anyOf": branches})]))
    assert answered >= IN_FLIGHT_ANSWERS
    assert r.status_code == 200
    assert "repair_requested:echo" in r.headers["x-guardproxy-actions"]
    assert "repaired:echo" in r.headers["x-guardproxy-actions"]
    assert len(mock_upstream.calls()) == 2


def test_ref_bomb_is_refused_while_reuse_and_recursion_are_accepted(gp: Proxy, mock_upstream: Mock) -> None:
    # 11 levels of 10 references each: a 2 KB schema whose validation walks 10^11 paths.
    tag = _tag()
    defs: dict[str, Any] = {"l0": {"type": "string", "minLength": 1, "description": tag}}
    for k in range(1, 12):
        defs[f"l{k}"] = {"allOf": [{"$ref": f"#/$defs/l{k - 1}"}] * 10}
    bomb = {"type": "object", "$defs": defs, "properties": {"text": {"$ref": "#/$defs/l11"}}}
    mock_upstream.script({"tool_calls": [{"name": "bomb", "arguments": '{"text": 1}'}]})
    conversation = f"refbomb-{tag}"
    r = _post(gp, _body(tools=[_tool("bomb", bomb)]), conversation)
    assert _error(r) == (400, "schema_too_complex", "tools")
    assert "$ref" in r.json()["error"]["message"]
    assert mock_upstream.calls() == []
    assert _nothing_spent(gp, conversation)

    # Definitions reused by reference (as Pydantic writes them) and a recursive tree stay accepted, and the
    # model's arguments are still checked against them; every violation of the reused ones is reported.
    mock_upstream.reset()
    reuse = {"type": "object", "$defs": {"day": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
                                         "name": {"type": "string", "pattern": r"^\p{L}+$"}},
             "properties": {"start": {"$ref": "#/$defs/day"}, "end": {"$ref": "#/$defs/day"},
                            "owner": {"$ref": "#/$defs/name"}, "tag": {"const": tag}},
             "required": ["start", "end", "owner"]}
    tree = {"type": "object", "$defs": {"node": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "properties": {"root": {"$ref": "#/$defs/node"}, "tag": {"const": tag}}, "required": ["root"]}
    bad = {"start": "2025-01-02", "end": "tomorrow", "owner": "Zoë 2"}
    good = {"start": "2025-01-02", "end": "2025-01-03", "owner": "Zoë"}
    mock_upstream.script(
        {"tool_calls": [{"name": "book", "arguments": orjson.dumps(bad).decode()}]},
        {"tool_calls": [{"name": "book", "arguments": orjson.dumps(good).decode()},
                        {"name": "tree", "arguments": orjson.dumps({"root": {"name": "a", "children": [
                            {"name": "b", "children": [{"name": "c"}]}]}}).decode()}]})
    r = _post(gp, _body(tools=[_tool("book", reuse), _tool("tree", tree)]))
    assert r.status_code == 200
    assert [c["function"]["name"] for c in r.json()["choices"][0]["message"]["tool_calls"]] == ["book", "tree"]
    assert "repaired:book" in r.headers["x-guardproxy-actions"]
    repair_prompt = orjson.dumps(mock_upstream.calls()[1]["body"]["messages"]).decode()
    assert "/end" in repair_prompt and "/owner" in repair_prompt


# --- caps checked before compiling ----------------------------------------------------------------


def _oversize(tag: str) -> dict[str, Any]:
    # ~90 KB of canonical JSON, over the default max_schema_bytes (65536)
    return {"type": "object", "description": tag,
            "properties": {f"field_{i}": {"type": "string", "maxLength": i} for i in range(2500)}}


def _overdeep(tag: str, levels: int = 20) -> dict[str, Any]:
    # every level is two nesting steps (the schema and its properties): 41 > max_schema_depth (32)
    schema: dict[str, Any] = {"type": "string", "description": tag}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("shape", ["oversize", "overdeep"])
def test_over_limit_tool_schema_is_refused_before_upstream(gp: Proxy, mock_upstream: Mock, shape: str) -> None:
    tag = _tag()
    params = _oversize(tag) if shape == "oversize" else _overdeep(tag)
    conversation = f"{shape}-{tag}"
    for _ in range(2):  # the second time from the cache: refused the same way
        r = _post(gp, _body(tools=[_tool("get_weather", params)]), conversation)
        assert _error(r) == (400, "schema_too_complex", "tools")
        assert "get_weather" in r.json()["error"]["message"]
    assert mock_upstream.calls() == []
    assert _nothing_spent(gp, conversation)


def test_over_limit_legacy_function_schema_names_functions(gp: Proxy, mock_upstream: Mock) -> None:
    fn = {"name": "get_weather", "parameters": _overdeep(_tag())}
    r = _post(gp, _body(functions=[fn]))
    assert _error(r) == (400, "schema_too_complex", "functions")
    assert mock_upstream.calls() == []


def test_over_limit_response_format_schema_is_refused(gp: Proxy, mock_upstream: Mock) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": _oversize(_tag())}}
    r = _post(gp, _body(response_format=rf))
    assert _error(r) == (400, "schema_too_complex", "response_format")
    assert mock_upstream.calls() == []


def test_pattern_too_large_for_the_engine_is_refused(gp: Proxy, mock_upstream: Mock) -> None:
    # The issue's \p{L}{200}: one pattern that compiled for ~100 ms on the loop before the fix.
    r = _post(gp, _body(tools=[_string_tool("lookup", rf"^\p{{L}}{{200}}{_tag()}$")]))
    assert _error(r) == (400, "invalid_request", "tools")
    assert "compiled size" in r.json()["error"]["message"]
    assert mock_upstream.calls() == []


def test_too_many_patterns_in_one_schema_are_refused(gp: Proxy, mock_upstream: Mock) -> None:
    tag = _tag()
    params = {"type": "object", "properties": {
        f"f{i}": {"type": "string", "pattern": f"^{tag}{i}$"} for i in range(65)}}
    r = _post(gp, _body(tools=[_tool("lookup", params)]))
    assert _error(r) == (400, "schema_too_complex", "tools")
    assert mock_upstream.calls() == []


def test_request_compile_budget_is_enforced(gp: Proxy, mock_upstream: Mock) -> None:
    # 500 schemas each within every per-schema cap, each costly to compile: together far beyond the
    # per-request compile budget, so the request is refused instead of compiling them all.
    tag = _tag()
    tools = [_string_tool(f"lookup_{i}", rf"^\p{{L}}{{5}}{tag}{i}$") for i in range(500)]
    r = _post(gp, _body(tools=tools))
    assert _error(r) == (400, "schema_too_complex", "tools")
    assert "budget" in r.json()["error"]["message"]
    assert mock_upstream.calls() == []


def test_513_tools_are_refused(gp: Proxy, mock_upstream: Mock) -> None:
    tools = [_tool(f"t{i}", {"type": "object"}) for i in range(500)]
    functions = [{"name": f"f{i}", "parameters": {"type": "object"}} for i in range(13)]
    r = _post(gp, _body(tools=tools, functions=functions))
    assert _error(r) == (400, "too_many_tools", "tools")
    assert mock_upstream.calls() == []
    # 512 is still allowed
    mock_upstream.script({"content": "ok"})
    assert _post(gp, _body(tools=tools, functions=functions[:12])).status_code == 200
