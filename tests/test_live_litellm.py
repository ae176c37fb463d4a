"""The litellm library path (non-OpenAI providers), end to end against the scripted model.

``litellm_proxy/<model>`` is a litellm provider that speaks the OpenAI protocol, so the adapter in
``proxy/upstream_litellm.py`` can be exercised offline against ``guardproxy mock-upstream``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import PLAY_KEY, Mock, Proxy, default_config, free_port

_ORG = """apiVersion: guardproxy/v1
kind: Policy
metadata: {name: org-base}
match: {all: true}
tools: {deny: ["delete_*"]}
"""


@pytest.fixture(scope="module")
def via_litellm(make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> Proxy:
    cfg = default_config(mock_upstream.url, free_port())
    cfg["models"] = [{"name": "gpt-4o-mini", "upstream": "litellm_proxy/gpt-4o-mini", "api_base": mock_upstream.url,
                      "api_key": "sk-upstream-secret-not-for-clients",
                      "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}]
    policies = {"org-base.yaml": _ORG}
    return make_proxy(config=cfg, policies=policies)


def test_chat_through_litellm_adapter(via_litellm: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.reset()
    mock_upstream.script({"content": "via litellm", "usage": {"prompt_tokens": 10, "completion_tokens": 4}})
    raw = via_litellm.client(PLAY_KEY).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    resp = raw.parse()
    assert resp.choices[0].message.content == "via litellm"
    assert resp.usage.prompt_tokens == 10 and resp.usage.completion_tokens == 4
    # 10 x $0.15/M + 4 x $0.60/M = 3.9 µ$ -> 4 µ$
    assert raw.headers["x-guardproxy-cost-usd"] == "0.000004"
    call = mock_upstream.calls()[-1]
    assert call["body"]["model"] == "gpt-4o-mini"
    assert call["headers"]["authorization"] == "Bearer sk-upstream-secret-not-for-clients"


def test_blocked_tool_call_through_litellm_adapter_streamed(via_litellm: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.reset()
    mock_upstream.script({"tool_calls": [{"name": "delete_account", "arguments": '{"id": "c1"}'}]})
    stream = via_litellm.client(PLAY_KEY).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "do it"}], stream=True,
        tools=[{"type": "function", "function": {"name": "get_ticket_history", "parameters": {"type": "object"}}}])
    chunks = list(stream)
    names = [tc.function.name for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert names == []
    assert "delete_account" in text and "[guardproxy]" in text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
