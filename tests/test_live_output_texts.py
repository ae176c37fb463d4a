"""Every text the model hands the agent is checked, whatever field carries it, streamed or not (live).

``output.deny_patterns`` apply to the content (a string or parts of any type that carry text), refusals,
reasoning, audio transcripts, any other text field, and to tool-call arguments (the call is removed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from conftest import PLAY_KEY, SANDBOX_GUARD, Mock, Proxy, shipped_policies

SECRET = "the word is SWORDFISH"


@pytest.fixture(scope="module")
def gp(make_proxy: Callable[..., Proxy]) -> Proxy:
    return make_proxy(policies={**shipped_policies(), "sandbox-guard.yaml": SANDBOX_GUARD})


@pytest.fixture(autouse=True)
def _fresh(mock_upstream: Mock) -> None:
    mock_upstream.reset()


def _post(p: Proxy, **body: Any) -> httpx.Response:
    doc = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **body}
    return p.post("/v1/chat/completions", key=PLAY_KEY, json=doc)


MESSAGE_FIELDS = [
    {"content": [{"type": "refusal", "refusal": SECRET}]},
    {"content": [{"type": "text", "text": "fine"}, {"type": "refusal", "refusal": SECRET}]},
    {"content": [{"type": "output_text", "text": SECRET}]},
    {"content": [{"type": "text", "text": "fine", "annotations": [{"type": "url_citation", "title": SECRET}]}]},
    {"refusal": SECRET},
    {"reasoning_content": SECRET},
    {"audio": {"id": "a1", "transcript": SECRET, "data": "AAAA"}},
    {"some_new_field": {"nested": [SECRET]}},
]


@pytest.mark.parametrize("raw", MESSAGE_FIELDS, ids=lambda r: str(r)[:50])
def test_a_non_streamed_message_is_checked_in_every_field(gp: Proxy, mock_upstream: Mock, raw: Any) -> None:
    mock_upstream.script({"content": "fine", "raw_message": raw})
    r = _post(gp)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "policy_denied"
    assert "SWORDFISH" not in r.text


STREAM_DELTAS = [
    [{"audio": {"id": "a1", "transcript": "SWORD"}}, {"audio": {"transcript": "FISH"}}],
    [{"refusal": "SWORD"}, {"refusal": "FISH"}],
    [{"reasoning_content": "SWORD"}, {"reasoning_content": "FISH"}],
    [{"some_new_field": {"text": "SWORDFISH"}}],
]


@pytest.mark.parametrize("deltas", STREAM_DELTAS, ids=lambda d: str(d)[:50])
def test_a_stream_is_checked_in_every_field(gp: Proxy, mock_upstream: Mock, deltas: Any) -> None:
    mock_upstream.script({"content": "fine", "raw_deltas": deltas})
    raw = gp.stream_bytes({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}, PLAY_KEY)
    assert b"SWORD" not in raw and b"FISH" not in raw
    assert b'"code":"policy_denied"' in raw


def test_a_streamed_transcript_that_passes_is_delivered_after_the_check(gp: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "fine", "raw_deltas": [{"audio": {"id": "a1", "transcript": "hello "}},
                                                            {"audio": {"transcript": "there"}}]})
    raw = gp.stream_bytes({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}, PLAY_KEY)
    assert b"hello " in raw and b"there" in raw and b"[DONE]" in raw


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("arguments", ['{"body": "SWORDFISH"}', '{"body": "SWORD\\u0046ISH"}'])
def test_tool_call_arguments_are_checked_and_the_call_removed(gp: Proxy, mock_upstream: Mock, stream: bool,
                                                              arguments: str) -> None:
    mock_upstream.script({"tool_calls": [{"name": "send_email", "arguments": arguments},
                                         {"name": "get_weather", "arguments": '{"city": "Paris"}'}]})
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
             for n in ("send_email", "get_weather")]
    if stream:
        raw = gp.stream_bytes({"model": "gpt-4o-mini", "tools": tools,
                               "messages": [{"role": "user", "content": "hi"}]}, PLAY_KEY)
        assert b"SWORD" not in raw and b"send_email" not in raw and b"get_weather" in raw
        return
    r = _post(gp, tools=tools)
    assert r.status_code == 200
    calls = r.json()["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert "tool_denied:send_email" in r.headers["x-guardproxy-actions"]
    assert "SWORD" not in r.text
