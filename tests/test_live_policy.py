"""Live-server tests of the policy engine: the real ``guardproxy serve`` driven by the ``openai`` SDK.

Request side (tools stripped, forced tools and models refused, parameters clamped), response side
(disallowed and look-alike tool calls blocked, streamed and not; escalation; once per conversation;
strict argument parsing with repair; structured-output rewrite), shadow mode and hot reload.
The upstream is the scripted ``guardproxy mock-upstream``. Support-agent replies are scripted as
tool calls (no content) so the pinned TicketAction output schema does not interfere.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from conftest import ADMIN_KEY, PLAY_KEY, SUPPORT_KEY, Mock, Proxy, shipped_policies

CONV = "x-guardproxy-conversation-id"
MARK = "[guardproxy]"


@pytest.fixture(autouse=True)
def _fresh_mock(mock_upstream: Mock) -> None:
    """No scripted reply left over by a failed test leaks into the next one."""
    mock_upstream.reset()


def tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


def conv() -> dict[str, str]:
    """A fresh conversation: apply_credit is once_per_conversation."""
    return {CONV: "conv-" + uuid.uuid4().hex}


def call(name: str, arguments: str, id: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "arguments": arguments}
    if id is not None:
        out["id"] = id
    return out


def actions(raw: Any) -> list[str]:
    value = raw.headers.get("x-guardproxy-actions", "")
    return value.split(",") if value else []


def chat(p: Proxy, key: str = SUPPORT_KEY, **kw: Any) -> Any:
    """Non-streamed completion through the SDK; returns the raw response (``.parse()``, ``.headers``)."""
    kw.setdefault("model", "gpt-4o-mini")
    kw.setdefault("messages", [{"role": "user", "content": "help the customer"}])
    kw.setdefault("extra_headers", conv())
    return p.client(key).chat.completions.with_raw_response.create(**kw)


def chat_stream(p: Proxy, key: str = SUPPORT_KEY, **kw: Any) -> list[Any]:
    kw.setdefault("model", "gpt-4o-mini")
    kw.setdefault("messages", [{"role": "user", "content": "help the customer"}])
    kw.setdefault("extra_headers", conv())
    with p.client(key).chat.completions.create(stream=True, **kw) as stream:
        return list(stream)


def raw_stream(p: Proxy, body: dict[str, Any], key: str = SUPPORT_KEY) -> bytes:
    """The exact bytes the client receives for a streamed request."""
    headers = {"authorization": f"Bearer {key}", **conv()}
    chunks: list[bytes] = []
    with httpx.stream("POST", p.url + "/chat/completions", json={**body, "stream": True}, headers=headers,
                      timeout=30) as r:
        assert r.status_code == 200
        chunks.extend(r.iter_bytes())
    return b"".join(chunks)


def stream_summary(chunks: list[Any]) -> tuple[str, list[tuple[str, str]], list[str]]:
    """(content, [(name, arguments)] of tool calls, finish reasons) of SDK stream chunks."""
    text: list[str] = []
    calls: dict[int, list[str]] = {}
    finishes: list[str] = []
    for ch in chunks:
        for c in ch.choices:
            if c.delta.content:
                text.append(c.delta.content)
            for tc in c.delta.tool_calls or ():
                slot = calls.setdefault(tc.index, ["", ""])
                if tc.function and tc.function.name:
                    slot[0] += tc.function.name
                if tc.function and tc.function.arguments:
                    slot[1] += tc.function.arguments
            if c.finish_reason:
                finishes.append(c.finish_reason)
    return "".join(text), [(n, a) for _, (n, a) in sorted(calls.items())], finishes


# --- request side ---------------------------------------------------------------------------------------


def test_disallowed_tool_is_stripped_before_upstream(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"tool_calls": [call("get_customer_account", '{"customer_id":"c1"}')]})
    raw = chat(proxy, tools=[tool("get_customer_account"), tool("delete_account"), tool("apply_credit")])
    sent = [t["function"]["name"] for t in mock_upstream.calls()[-1]["body"]["tools"]]
    assert sent == ["get_customer_account", "apply_credit"]
    assert "tool_stripped:delete_account" in actions(raw)
    assert raw.parse().choices[0].message.tool_calls[0].function.name == "get_customer_account"


def test_tool_choice_forcing_disallowed_tool_is_refused(proxy: Proxy, mock_upstream: Mock) -> None:
    before = len(mock_upstream.calls())
    with pytest.raises(openai.PermissionDeniedError) as exc:
        chat(proxy, tools=[tool("get_customer_account"), tool("delete_account")],
             tool_choice={"type": "function", "function": {"name": "delete_account"}})
    assert exc.value.status_code == 403 and exc.value.code == "tool_not_allowed"
    assert len(mock_upstream.calls()) == before


def test_disallowed_model_is_refused(proxy: Proxy, mock_upstream: Mock) -> None:
    before = len(mock_upstream.calls())
    with pytest.raises(openai.PermissionDeniedError) as exc:
        chat(proxy, model="gpt-4.1")
    assert exc.value.code == "model_not_allowed"
    assert len(mock_upstream.calls()) == before


def test_temperature_is_clamped(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"tool_calls": [call("get_customer_account", '{"customer_id":"c1"}')]})
    raw = chat(proxy, temperature=0.9, tools=[tool("get_customer_account")])
    assert mock_upstream.calls()[-1]["body"]["temperature"] == 0.2
    assert "clamped:temperature" in actions(raw)


def test_legacy_functions_are_stripped_and_forcing_refused(proxy: Proxy, mock_upstream: Mock) -> None:
    fns = [{"name": "get_customer_account", "parameters": {"type": "object"}},
           {"name": "delete_account", "parameters": {"type": "object"}}]
    mock_upstream.script({"tool_calls": [call("get_customer_account", '{"customer_id":"c1"}')]})
    raw = chat(proxy, functions=fns)
    assert [f["name"] for f in mock_upstream.calls()[-1]["body"]["functions"]] == ["get_customer_account"]
    assert "tool_stripped:delete_account" in actions(raw)
    assert raw.parse().choices[0].message.function_call.name == "get_customer_account"
    with pytest.raises(openai.PermissionDeniedError) as exc:
        chat(proxy, functions=fns, function_call={"name": "delete_account"})
    assert exc.value.code == "tool_not_allowed"


# --- response side: blocked calls -----------------------------------------------------------------------

DELETE = call("delete_account", '{"customer_id":"c-secret-77"}')


def test_disallowed_call_in_response_is_blocked(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"tool_calls": [DELETE]})
    raw = chat(proxy, tools=[tool("get_customer_account")])
    choice = raw.parse().choices[0]
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert choice.message.content.startswith(MARK) and "not performed" in choice.message.content
    assert "c-secret-77" not in choice.message.content
    assert "tool_denied:delete_account" in actions(raw)


def test_disallowed_call_in_stream_is_blocked(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"tool_calls": [DELETE]})
    content, calls, finishes = stream_summary(chat_stream(proxy, tools=[tool("get_customer_account")]))
    assert calls == []
    assert finishes == ["stop"]
    assert content.startswith(MARK)


def test_disallowed_call_in_stream_never_sent_raw(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"tool_calls": [DELETE]})
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
            "tools": [tool("get_customer_account")]}
    data = raw_stream(proxy, body)
    events = [e for e in data.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    # The explanation names the tool, but no tool-call delta and no argument byte ever leaves the proxy.
    assert b"tool_calls" not in data and b"function_call" not in data
    assert b'"name":"delete_account"' not in data and b"c-secret-77" not in data
    for e in events[:-1]:
        chunk = json.loads(e[len(b"data: "):])
        for c in chunk["choices"]:
            assert "delete_account" not in json.dumps(c["delta"].get("tool_calls"))


BYPASS_NAMES = [
    "Apply_Credit",
    "apply_credit ",
    "apply_credit\u200b",
    "\u0430pply_credit",  # Cyrillic a
    "\uff41\uff50\uff50\uff4c\uff59_credit",  # full-width apply
    "multi_tool_use.parallel",
    "",
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("name", BYPASS_NAMES, ids=ascii)
def test_lookalike_tool_names_are_denied(proxy: Proxy, mock_upstream: Mock, name: str, stream: bool) -> None:
    mock_upstream.script({"tool_calls": [call(name, '{"customer_id":"c1","amount":10}')]})
    tools = [tool("get_customer_account"), tool("apply_credit")]
    if stream:
        content, calls, finishes = stream_summary(chat_stream(proxy, tools=tools))
        assert calls == [] and finishes == ["stop"] and content.startswith(MARK)
        return
    raw = chat(proxy, tools=tools)
    choice = raw.parse().choices[0]
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop" and choice.message.content.startswith(MARK)
    assert any(a.startswith("tool_denied:") for a in actions(raw))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_forbidden_call_among_parallel_calls(proxy: Proxy, mock_upstream: Mock, stream: bool) -> None:
    mock_upstream.script({"tool_calls": [call("get_customer_account", '{"customer_id":"c1"}', "call_a"),
                                         call("delete_account", '{"customer_id":"c1"}', "call_b")]})
    tools = [tool("get_customer_account")]
    if stream:
        _, calls, finishes = stream_summary(chat_stream(proxy, tools=tools))
        assert calls == [("get_customer_account", '{"customer_id":"c1"}')]
        assert finishes == ["tool_calls"]
        return
    raw = chat(proxy, tools=tools)
    choice = raw.parse().choices[0]
    assert [(t.id, t.function.name) for t in choice.message.tool_calls] == [("call_a", "get_customer_account")]
    assert choice.finish_reason == "tool_calls"
    assert "tool_denied:delete_account" in actions(raw)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_forbidden_legacy_function_call_is_blocked(proxy: Proxy, mock_upstream: Mock, stream: bool) -> None:
    mock_upstream.script({"tool_calls": [DELETE]})
    fns = [{"name": "get_customer_account", "parameters": {"type": "object"}}]
    if stream:
        chunks = chat_stream(proxy, functions=fns)
        assert not any(c.delta.function_call for ch in chunks for c in ch.choices)
        content, _, finishes = stream_summary(chunks)
        assert finishes == ["stop"] and content.startswith(MARK)
        return
    raw = chat(proxy, functions=fns)
    choice = raw.parse().choices[0]
    assert choice.message.function_call is None and choice.message.tool_calls is None
    assert choice.finish_reason == "stop" and choice.message.content.startswith(MARK)


# --- response side: arguments ---------------------------------------------------------------------------


def test_credit_over_50_is_escalated(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"tool_calls": [call("apply_credit", '{"customer_id":"c1","amount":75}', "call_c")]})
    raw = chat(proxy, tools=[tool("apply_credit"), tool("escalate_to_human")])
    choice = raw.parse().choices[0]
    (tc,) = choice.message.tool_calls
    assert tc.id == "call_c" and tc.function.name == "escalate_to_human"
    assert json.loads(tc.function.arguments) == {
        "reason": "Credits over $50 always require human review",
        "original_tool": "apply_credit",
        "original_arguments": {"customer_id": "c1", "amount": 75},
    }
    assert choice.finish_reason == "tool_calls"
    assert "escalated:apply_credit" in actions(raw)


def test_credit_over_50_is_escalated_in_stream(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"tool_calls": [call("apply_credit", '{"customer_id":"c1","amount":75}')]})
    _, calls, _ = stream_summary(chat_stream(proxy, tools=[tool("apply_credit")]))
    ((name, args),) = calls
    assert name == "escalate_to_human"
    assert json.loads(args)["original_arguments"] == {"customer_id": "c1", "amount": 75}


def test_small_credit_passes_unchanged_once_per_conversation(proxy: Proxy, mock_upstream: Mock) -> None:
    args = '{"customer_id":"c1", "amount":20}'
    headers = conv()
    mock_upstream.script({"tool_calls": [call("apply_credit", args)]}, {"tool_calls": [call("apply_credit", args)]})
    first = chat(proxy, tools=[tool("apply_credit")], extra_headers=headers).parse().choices[0]
    (tc,) = first.message.tool_calls
    assert (tc.function.name, tc.function.arguments) == ("apply_credit", args)
    assert first.finish_reason == "tool_calls"
    raw = chat(proxy, tools=[tool("apply_credit")], extra_headers=headers)
    second = raw.parse().choices[0]
    assert second.message.tool_calls is None and second.finish_reason == "stop"
    assert "once_per_conversation" in second.message.content
    assert "tool_denied:apply_credit" in actions(raw)
    # A different conversation may credit again.
    mock_upstream.script({"tool_calls": [call("apply_credit", args)]})
    other = chat(proxy, tools=[tool("apply_credit")]).parse().choices[0]
    assert other.message.tool_calls[0].function.arguments == args


INVALID_ARGS = {
    "not_json": '{"customer_id":"c1","amount":',
    "duplicate_key": '{"customer_id":"c","amount":1,"amount":500}',
    "nan": '{"customer_id":"c","amount":NaN}',
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("kind", list(INVALID_ARGS))
def test_invalid_arguments_are_repaired(proxy: Proxy, mock_upstream: Mock, kind: str, stream: bool) -> None:
    good = '{"customer_id":"c","amount":1}'
    mock_upstream.script({"tool_calls": [call("apply_credit", INVALID_ARGS[kind], "call_bad")]},
                         {"tool_calls": [call("apply_credit", good)]})
    before = len(mock_upstream.calls())
    if stream:
        _, calls, _ = stream_summary(chat_stream(proxy, tools=[tool("apply_credit")]))
        assert calls == [("apply_credit", good)]
    else:
        raw = chat(proxy, tools=[tool("apply_credit")])
        (tc,) = raw.parse().choices[0].message.tool_calls
        assert tc.function.arguments == good
        assert "repair_requested:apply_credit" in actions(raw) and "repaired:apply_credit" in actions(raw)
    sent = mock_upstream.calls()[before:]
    assert len(sent) == 2
    feedback = sent[1]["body"]["messages"]
    assert feedback[-1]["role"] == "tool" and "rejected" in feedback[-1]["content"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("kind", list(INVALID_ARGS))
def test_invalid_arguments_never_reach_client(proxy: Proxy, mock_upstream: Mock, kind: str, stream: bool) -> None:
    bad = {"tool_calls": [call("apply_credit", INVALID_ARGS[kind])]}
    mock_upstream.script(bad, bad)  # the repair attempt is just as bad
    if stream:
        content, calls, finishes = stream_summary(chat_stream(proxy, tools=[tool("apply_credit")]))
        assert calls == [] and finishes == ["stop"] and content.startswith(MARK)
        return
    raw = chat(proxy, tools=[tool("apply_credit")])
    choice = raw.parse().choices[0]
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop" and choice.message.content.startswith(MARK)
    assert "schema_denied:apply_credit" in actions(raw)


# --- structured output ----------------------------------------------------------------------------------

TICKET = {"action": "resolve", "reason": "refund issued", "confidence": 0.6, "requires_human_review": False}


def test_low_confidence_output_requires_review(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": json.dumps(TICKET)})
    raw = chat(proxy)
    assert json.loads(raw.parse().choices[0].message.content) == {**TICKET, "requires_human_review": True}
    assert "output_rewritten:low-confidence-needs-review" in actions(raw)


def test_low_confidence_output_requires_review_in_stream(proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": json.dumps(TICKET)})
    content, _, finishes = stream_summary(chat_stream(proxy))
    assert json.loads(content) == {**TICKET, "requires_human_review": True}
    assert finishes == ["stop"]


def test_confident_output_is_unchanged(proxy: Proxy, mock_upstream: Mock) -> None:
    confident = json.dumps({**TICKET, "confidence": 0.9})
    mock_upstream.script({"content": confident})
    assert chat(proxy).parse().choices[0].message.content == confident


# --- shadow mode ----------------------------------------------------------------------------------------

SHADOW = """\
apiVersion: guardproxy/v1
kind: Policy
metadata: {name: support-shadow}
match: {keys: [support-agent]}
mode: shadow
models:
  allow: [gpt-4o-mini]
  params:
    temperature: {max: 0.1}
tools:
  deny: [get_ticket_history]
"""


@pytest.fixture(scope="module")
def shadow_proxy(make_proxy: Callable[..., Proxy]) -> Proxy:
    return make_proxy(policies={"org-base.yaml": shipped_policies()["org-base.yaml"], "shadow.yaml": SHADOW})


def test_shadow_policy_changes_nothing_but_reports(shadow_proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"tool_calls": [call("get_ticket_history", '{"ticket_id":"t1"}')]})
    # max_tokens given so that org-base (enforced) has nothing to clamp: every action must be shadow.
    raw = chat(shadow_proxy, model="gpt-4o", temperature=0.5, max_tokens=100, tools=[tool("get_ticket_history")])
    sent = mock_upstream.calls()[-1]["body"]
    assert sent["model"] == "gpt-4o" and sent["temperature"] == 0.5 and sent["max_tokens"] == 100
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_ticket_history"]
    (tc,) = raw.parse().choices[0].message.tool_calls
    assert (tc.function.name, tc.function.arguments) == ("get_ticket_history", '{"ticket_id":"t1"}')
    acts = actions(raw)
    for would in ("would_deny_model:gpt-4o", "would_tool_stripped:get_ticket_history",
                  "would_clamped:temperature", "would_tool_denied:get_ticket_history"):
        assert would in acts
    assert not [a for a in acts if not a.startswith("would_")]


def test_shadow_policy_in_stream_passes_the_call(shadow_proxy: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"tool_calls": [call("get_ticket_history", '{"ticket_id":"t1"}')]})
    _, calls, finishes = stream_summary(chat_stream(shadow_proxy, tools=[tool("get_ticket_history")]))
    assert calls == [("get_ticket_history", '{"ticket_id":"t1"}')] and finishes == ["tool_calls"]


# --- hot reload -----------------------------------------------------------------------------------------

TEAM = """\
apiVersion: guardproxy/v1
kind: Policy
metadata: {{name: playground-tools}}
match: {{keys: [playground]}}
tools:
  deny: [{deny}]
"""


def _stripped(p: Proxy, mock: Mock, name: str) -> tuple[bool, str]:
    """Whether ``name`` is stripped from a playground request, and the revision that answered."""
    mock.script({"content": "ok"})
    raw = chat(p, PLAY_KEY, tools=[tool(name), tool("keep_me")])
    sent = [t["function"]["name"] for t in mock.calls()[-1]["body"]["tools"]]
    assert raw.parse().choices[0].message.content == "ok"
    return name not in sent, raw.headers["x-guardproxy-policy-revision"]


def _poll(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5.0
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_hot_reload_applies_and_survives_broken_edits(make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> None:
    policies = {"org-base.yaml": shipped_policies()["org-base.yaml"], "team.yaml": TEAM.format(deny="refund_*")}
    p = make_proxy(policies=policies)
    team = p.dir / "policies" / "team.yaml"

    def ready() -> dict[str, Any]:
        doc: dict[str, Any] = p.get("/readyz", key=None).json()
        return doc

    rev1 = ready()["policy_revision"]
    assert _stripped(p, mock_upstream, "refund_order") == (True, rev1)
    assert _stripped(p, mock_upstream, "get_ticket_history") == (False, rev1)

    # A good edit takes effect without restart.
    team.write_text(TEAM.format(deny="refund_*, get_ticket_history"))
    _poll(lambda: ready()["policy_revision"] != rev1, "the edit to load")
    rev2 = ready()["policy_revision"]
    assert _stripped(p, mock_upstream, "get_ticket_history") == (True, rev2)

    # A broken edit keeps the last good revision serving and reports the errors.
    team.write_text(TEAM.format(deny="refund_*, get_ticket_history").replace("deny:", "deny_list:"))
    _poll(lambda: bool(ready()["policy_errors"]), "the broken edit to be reported")
    doc = ready()
    assert doc["status"] == "ready" and doc["policy_revision"] == rev2
    assert any("team.yaml" in e for e in doc["policy_errors"])
    assert _stripped(p, mock_upstream, "get_ticket_history") == (True, rev2)
    r = p.post("/admin/reload", key=ADMIN_KEY)
    assert r.status_code == 422
    assert r.json()["reloaded"] is False and r.json()["policy_revision"] == rev2
    assert any("team.yaml" in e for e in r.json()["errors"])
    assert p.post("/admin/reload", key=SUPPORT_KEY).status_code == 403

    # Fixing it reloads again.
    team.write_text(TEAM.format(deny="refund_*, drop_table_x"))
    _poll(lambda: ready()["policy_revision"] not in (rev1, rev2), "the fix to load")
    doc = ready()
    assert doc["policy_errors"] == []
    rev3 = doc["policy_revision"]
    assert _stripped(p, mock_upstream, "get_ticket_history") == (False, rev3)
    r = p.post("/admin/reload", key=ADMIN_KEY)
    assert r.status_code == 200 and r.json() == {"reloaded": True, "policy_revision": rev3, "errors": []}


# --- schemas (issue: schema-validated tool calls and structured outputs) ------------------------------------


def test_looser_declared_schema_does_not_override_the_pinned_one(proxy: Proxy, mock_upstream: Mock) -> None:
    """apply_credit's pinned schema needs a numeric amount; the agent declaring ``{}`` changes nothing."""
    loose = [{"type": "function", "function": {"name": "apply_credit", "parameters": {"type": "object"}}}]
    bad = {"tool_calls": [{"name": "apply_credit", "arguments": '{"customer_id": "c1", "amount": "fifty"}'}]}
    mock_upstream.script(bad, bad)
    raw = proxy.client(SUPPORT_KEY).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "credit"}], tools=loose, extra_headers=conv())
    msg = raw.parse().choices[0].message
    assert not msg.tool_calls
    assert "schema_denied:apply_credit" in raw.headers["x-guardproxy-actions"]
    assert len(mock_upstream.calls()) == 2  # the first answer and one repair
    assert "amount" in (msg.content or "")


def test_ticket_action_without_confidence_is_repaired_or_refused(proxy: Proxy, mock_upstream: Mock) -> None:
    missing = json.dumps({"action": "resolve", "reason": "done", "requires_human_review": False})
    valid = json.dumps({"action": "resolve", "reason": "done", "confidence": 0.9, "requires_human_review": False})
    mock_upstream.script({"content": missing}, {"content": valid})
    raw = proxy.client(SUPPORT_KEY).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "close it"}], extra_headers=conv())
    assert json.loads(raw.parse().choices[0].message.content) == json.loads(valid)
    assert "repaired:output" in raw.headers["x-guardproxy-actions"]
    mock_upstream.script({"content": missing}, {"content": missing})
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        proxy.client(SUPPORT_KEY).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "close it"}], extra_headers=conv())
    err = exc.value.response.json()["error"]
    assert err["code"] == "schema_validation_failed"
    assert any("confidence" in e for e in err["errors"])
