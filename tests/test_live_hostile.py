"""A hostile model and hostile requests, through the live server (regressions from the security review).

The scripted upstream's ``raw_message``, ``extra_choices`` and ``raw_deltas`` let a test send exactly
the odd shapes a misbehaving model or provider could: legacy and modern tool calls in one message,
extra fields on a call, text in ``refusal``, malformed messages and deltas.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest
from conftest import ADMIN_KEY, PLAY_KEY, SANDBOX_GUARD, Mock, Proxy, shipped_policies


@pytest.fixture(scope="module")
def hostile(make_proxy: Callable[..., Proxy]) -> Proxy:
    return make_proxy(policies={**shipped_policies(), "sandbox-guard.yaml": SANDBOX_GUARD})


@pytest.fixture(autouse=True)
def _fresh(mock_upstream: Mock) -> None:
    mock_upstream.reset()


def _post(p: Proxy, body: dict, key: str = PLAY_KEY) -> httpx.Response:
    base = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    return p.post("/v1/chat/completions", key=key, json={**base, **body})


def _call(i: str, name: str, args: str = "{}") -> dict:
    return {"id": i, "type": "function", "function": {"name": name, "arguments": args}}


def test_denied_tool_call_beside_an_allowed_legacy_call_is_removed(hostile: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": None, "raw_message": {
        "tool_calls": [_call("x1", "get_weather"), _call("x2", "delete_everything")],
        "function_call": {"name": "get_weather", "arguments": "{}"}}})
    r = _post(hostile, {})
    assert r.status_code == 200
    assert "delete_everything" not in r.text.replace("tool_denied:delete_everything", "")
    msg = r.json()["choices"][0]["message"]
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather"]
    assert msg["function_call"]["name"] == "get_weather"


def test_denied_legacy_call_beside_allowed_tool_calls_is_removed(hostile: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": None, "raw_message": {
        "tool_calls": [_call("x1", "get_weather")], "function_call": {"name": "delete_everything", "arguments": "{}"}}})
    msg = _post(hostile, {}).json()["choices"][0]["message"]
    assert "function_call" not in msg
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather"]


def test_extra_fields_on_a_kept_call_are_not_copied(hostile: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": None, "raw_message": {"tool_calls": [
        {**_call("x1", "get_weather"), "type": "custom", "custom": {"name": "delete_everything", "input": "x"}}]}})
    msg = _post(hostile, {}).json()["choices"][0]["message"]
    assert msg["tool_calls"] == [_call("x1", "get_weather")]


def test_deny_patterns_apply_to_refusal_text(hostile: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "fine", "raw_message": {"refusal": "the word is SWORDFISH"}})
    r = _post(hostile, {})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "policy_denied"
    assert "SWORDFISH" not in r.text


def test_deny_patterns_apply_to_streamed_refusal_deltas(hostile: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "fine", "raw_deltas": [{"refusal": "SWORD"}, {"refusal": "FISH"}]})
    with httpx.stream("POST", hostile.root + "/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {PLAY_KEY}"},
                      json={"model": "gpt-4o-mini", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as r:
        raw = b"".join(r.iter_bytes())
    assert b"SWORD" not in raw and b"FISH" not in raw
    assert b'"code":"policy_denied"' in raw


def test_malformed_upstream_message_is_a_502_not_a_500(hostile: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "x", "extra_choices": [{"index": 1, "message": "not an object"}]})
    r = _post(hostile, {})
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_error"


def test_malformed_stream_delta_ends_with_an_error_event(hostile: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "x", "raw_deltas": [{"tool_calls": [{"index": "1", "function": {"name": "a"}}]}]})
    with httpx.stream("POST", hostile.root + "/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {PLAY_KEY}"},
                      json={"model": "gpt-4o-mini", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as r:
        raw = b"".join(r.iter_bytes())
    assert r.status_code == 200
    assert b'"code":"upstream_error"' in raw


def test_hostile_tool_name_after_a_repair_does_not_break_the_response(hostile: Proxy, mock_upstream: Mock) -> None:
    tools = [{"type": "function", "function": {"name": "apply_credit", "parameters": {
        "type": "object", "properties": {"amount": {"type": "number"}}, "required": ["amount"]}}}]
    mock_upstream.script({"tool_calls": [{"name": "apply_credit", "arguments": '{"amount": "fifty"}'}]},
                         {"tool_calls": [{"name": "apply_credit", "arguments": '{"amount": 5}'},
                                         {"name": "bad\u2028name\u4e2d", "arguments": "{}"}]})
    r = _post(hostile, {"tools": tools})
    assert r.status_code == 200
    names = [c["function"]["name"] for c in r.json()["choices"][0]["message"]["tool_calls"]]
    assert names == ["apply_credit"]
    assert "repaired:apply_credit" in r.headers["x-guardproxy-actions"]


def test_invalid_response_format_schema_is_a_400_and_holds_no_budget(hostile: Proxy, mock_upstream: Mock) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}
    headers = {"x-guardproxy-conversation-id": "hostile-schema"}
    for _ in range(3):
        r = hostile.post(
            "/v1/chat/completions", key=PLAY_KEY, headers=headers,
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "response_format": bad})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_request"
        assert r.json()["error"]["param"] == "response_format"
    assert mock_upstream.calls() == []
    rows = hostile.get("/v1/spend?prefix=conversation:playground/hostile-schema", key=ADMIN_KEY).json()["data"]
    assert rows == []  # nothing settled, and nothing reserved either (the check precedes the reservation)


def test_stream_with_n_above_one_is_refused(hostile: Proxy) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        hostile.client(PLAY_KEY).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True, n=2)
    assert exc.value.response.json()["error"]["param"] == "n"


def test_output_that_fails_after_the_upstream_answered_is_still_billed(hostile: Proxy, mock_upstream: Mock) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}}}
    mock_upstream.script({"content": "not json", "usage": {"prompt_tokens": 200, "completion_tokens": 1000}},
                         {"content": "still not json", "usage": {"prompt_tokens": 200, "completion_tokens": 1000}})
    r = hostile.post("/v1/chat/completions", key=PLAY_KEY, headers={"x-guardproxy-conversation-id": "billed-422"},
                     json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                           "response_format": fmt})
    assert r.status_code == 422
    rows = hostile.get("/v1/spend?prefix=conversation:playground/billed-422", key=ADMIN_KEY).json()["data"]
    # two calls of 200 + 1000 tokens at $0.15 / $0.60 per Mtok = 2 x 630 µ$
    assert [row["spend_usd"] for row in rows] == ["0.001260"]


def test_repair_of_a_stream_does_not_send_stream_options(hostile: Proxy, mock_upstream: Mock) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}}}
    mock_upstream.script({"content": "not json"}, {"content": '{"a": 1}'})
    chunks = list(hostile.client(PLAY_KEY).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], response_format=fmt, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == '{"a": 1}'
    first, repair = mock_upstream.calls()
    assert first["body"]["stream"] is True and "stream_options" in first["body"]
    assert repair["body"]["stream"] is False and "stream_options" not in repair["body"]


def test_n_choices_multiply_the_estimate_before_the_per_request_ceiling(hostile: Proxy, mock_upstream: Mock) -> None:
    """org-base allows $0.25 a request; 128 choices x 4096 tokens x $0.60/Mtok is $0.31, one choice $0.0025."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    one = hostile.post("/v1/chat/completions", key=PLAY_KEY, json=body)
    assert one.status_code == 200
    many = hostile.post("/v1/chat/completions", key=PLAY_KEY, json={**body, "n": 128})
    assert many.status_code == 429
    err = many.json()["error"]
    assert err["code"] == "budget_exceeded" and err["budget"]["scope"] == "request"
    assert len(mock_upstream.calls()) == 1
