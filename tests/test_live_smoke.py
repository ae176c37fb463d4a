"""Smoke test of the live server: plain chat through the official SDK (playground key)."""

from conftest import PLAY_KEY, Mock, Proxy


def test_plain_chat_reaches_mock_and_reports_headers(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.reset()
    mock_upstream.script({"content": "hi there", "usage": {"prompt_tokens": 11, "completion_tokens": 3}})
    raw = proxy.client(PLAY_KEY).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    resp = raw.parse()
    assert resp.choices[0].message.content == "hi there"
    assert resp.usage.prompt_tokens == 11 and resp.usage.completion_tokens == 3
    assert raw.headers["x-guardproxy-decision-id"].startswith("dec_")
    assert raw.headers["x-guardproxy-model"] == "gpt-4o-mini"
    # gpt-4o-mini: 11 x $0.15/M + 3 x $0.60/M = 3.45 µ$ -> rounded up to 4 µ$
    assert raw.headers["x-guardproxy-cost-usd"] == "0.000004"
    calls = mock_upstream.calls()
    assert calls[-1]["headers"]["authorization"] == "Bearer sk-upstream-secret-not-for-clients"
