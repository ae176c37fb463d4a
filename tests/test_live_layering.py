"""Live-server tests of layering and the policy core's edge cases, through the real ``guardproxy serve``.

- a team ``min`` above the org ``max`` is a load error: a reload with it is refused and the org limit keeps
  clamping what the upstream receives; ``guardproxy check`` reports it with file and line;
- CEL evaluation failures (the runtime's iteration budget) are the rule's ``on_error``, streamed or not;
- non-finite amounts (``"NaN"``, ``"Infinity"``, ...) never compare as small;
- every forcing field (``tool_choice``, ``function_call``) is checked;
- deny globs match case-insensitively (offered tools and returned calls), allow entries stay exact;
- team identity is ``(org, team)`` in ``match.teams``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import ADMIN_KEY, SUPPORT_KEY, Mock, Proxy, default_config

MARK = "[guardproxy]"
DEFAULT_SUPPORT_KEY = "sk-test-default-support"  # team support in org default, no key policy
ACME_SUPPORT_KEY = "sk-test-acme-support"  # team support in org acme
SANDBOX_KEY = "sk-test-sandbox"  # only the org-wide policy applies


@pytest.fixture(autouse=True)
def _fresh_mock(mock_upstream: Mock) -> None:
    mock_upstream.reset()


def config(mock: Mock) -> dict[str, Any]:
    cfg = default_config(mock.url, 0)
    cfg["keys"] += [
        {"id": "default-support", "key": DEFAULT_SUPPORT_KEY, "team": "support"},
        {"id": "acme-support", "key": ACME_SUPPORT_KEY, "team": "support", "org": "acme"},
        {"id": "sandbox", "key": SANDBOX_KEY, "team": "sandbox"},
    ]
    return cfg


def doc(name: str, match: str, body: str) -> str:
    return f"apiVersion: guardproxy/v1\nkind: Policy\nmetadata: {{name: {name}}}\nmatch: {match}\n{body}"


ORG = doc("org", "{all: true}", "tools:\n  deny: ['delete_*']\n")
AGENT = doc("agent", "{keys: [support-agent]}", """tools:
  default: deny
  allow:
    get_customer_account: {}
    apply_credit:
      rules:
        - id: credit-over-50-needs-approval
          when: "double(args.amount) > 50.0"
          action: require_approval
    scan_lines:
      rules:
        - id: no-line-over-50
          when: "args.lines.exists(l, l > 50)"
          action: deny
""")
TEAM_DEFAULT = doc("support-default", "{teams: [support]}", "tools:\n  deny: [alpha_tool]\n")
TEAM_ACME = doc("support-acme", "{teams: [acme/support]}", "tools:\n  deny: [beta_tool]\n")


@pytest.fixture(scope="module")
def lp(make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> Proxy:
    return make_proxy(policies={"org.yaml": ORG, "agent.yaml": AGENT, "team-default.yaml": TEAM_DEFAULT,
                                "team-acme.yaml": TEAM_ACME}, config=config(mock_upstream))


def tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


def body(**kw: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "help"}], **kw}


def post(p: Proxy, key: str, payload: dict[str, Any]) -> httpx.Response:
    return p.post("/v1/chat/completions", key=key, json=payload,
                  headers={"x-guardproxy-conversation-id": "conv-" + uuid.uuid4().hex})


def actions(r: Any) -> list[str]:
    value = r.headers.get("x-guardproxy-actions", "")
    return value.split(",") if value else []


def sent_tools(mock: Mock) -> list[str]:
    return [t["function"]["name"] for t in mock.calls()[-1]["body"].get("tools", [])]


def sse(p: Proxy, key: str, payload: dict[str, Any]) -> tuple[list[dict[str, Any]], bytes]:
    """The data events (parsed, without ``[DONE]``) and the exact bytes of a streamed request."""
    headers = {"authorization": f"Bearer {key}", "x-guardproxy-conversation-id": "conv-" + uuid.uuid4().hex}
    chunks: list[bytes] = []
    with httpx.stream("POST", p.url + "/chat/completions", json={**payload, "stream": True}, headers=headers,
                      timeout=60) as r:
        assert r.status_code == 200
        chunks.extend(r.iter_bytes())
    data = b"".join(chunks)
    events = [e[len(b"data: "):] for e in data.split(b"\n\n") if e.startswith(b"data: ")]
    assert events and events[-1] == b"[DONE]", data[-300:]
    return [json.loads(e) for e in events[:-1]], data


def call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"tool_calls": [{"name": name, "arguments": json.dumps(arguments)}]}


# --- 12: a team min above the org max -----------------------------------------------------------------------

LIMITS_ORG = doc("org-limits", "{all: true}", """models:
  params:
    temperature: {max: 1.0}
    max_tokens: {max: 256}
""")
LIMITS_TEAM = doc("team-limits", "{teams: [support]}", """models:
  params:
    temperature: {min: 1.9}
    max_tokens: {min: 4000}
""")


def test_team_min_above_org_max_is_refused_and_the_org_max_still_clamps(
        make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> None:
    p = make_proxy(policies={"org.yaml": LIMITS_ORG}, config=config(mock_upstream))
    (p.dir / "policies" / "team.yaml").write_text(LIMITS_TEAM)
    r = p.post("/admin/reload", key=ADMIN_KEY)
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert any("team.yaml" in e and "[models.params.temperature]" in e for e in errors), errors
    assert any("team.yaml" in e and "[models.params.max_tokens]" in e for e in errors), errors
    mock_upstream.script({"content": "ok"})
    resp = post(p, DEFAULT_SUPPORT_KEY, body(temperature=1.9, max_tokens=4000))
    assert resp.status_code == 200, resp.text
    sent = mock_upstream.calls()[-1]["body"]
    assert (sent["temperature"], sent["max_tokens"]) == (1.0, 256)
    assert "clamped:temperature" in actions(resp) and "clamped:max_tokens" in actions(resp)


def test_check_reports_the_empty_interval_as_an_error(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "org.yaml").write_text(LIMITS_ORG)
    (tmp_path / "policies" / "team.yaml").write_text(LIMITS_TEAM)
    cfg = tmp_path / "guardproxy.yaml"
    cfg.write_text(yaml.safe_dump({"policies": ["policies/"],
                                   "models": [{"name": "gpt-4o-mini", "upstream": "openai/gpt-4o-mini"}]}))
    result = subprocess.run([sys.executable, "-m", "proxy.cli", "check", "--config", str(cfg)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [ln for ln in result.stdout.splitlines() if ln.startswith("error: ")]
    team = tmp_path / "policies" / "team.yaml"
    assert any(e.startswith(f"error: {team}:7: [models.params.temperature]") and "org-limits" in e
               for e in errors), result.stdout
    assert any(e.startswith(f"error: {team}:8: [models.params.max_tokens]") for e in errors), result.stdout
    # The old, wrong claim is gone: the lower limit did not apply to a min.
    assert "the lower limit applies" not in result.stdout


# --- 15: the CEL iteration budget -----------------------------------------------------------------------

MANY_LINES = {"lines": [0] * 20_001}


def test_iteration_budget_is_an_evaluation_error_not_a_500(lp: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script(call("scan_lines", MANY_LINES))
    r = post(lp, SUPPORT_KEY, body(tools=[tool("scan_lines")]))
    assert r.status_code == 200, r.text[:500]
    assert r.headers["x-guardproxy-decision-id"]
    msg = r.json()["choices"][0]["message"]
    assert not msg.get("tool_calls") and msg["content"].startswith(MARK)
    assert "tool_denied:scan_lines" in actions(r)  # on_error: match (the default) on a deny rule


def test_iteration_budget_in_a_stream_ends_the_stream_properly(lp: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script(call("scan_lines", MANY_LINES))
    events, data = sse(lp, SUPPORT_KEY, body(tools=[tool("scan_lines")]))
    assert b"tool_calls" not in data and b'"error"' not in data
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
    assert text.startswith(MARK) and finishes == ["stop"]


# --- 16: non-finite amounts ----------------------------------------------------------------------------------


def test_non_finite_amounts_are_held_for_approval(lp: Proxy, mock_upstream: Mock) -> None:
    for amount in ("NaN", "nan", "-nan", "Infinity", "-Infinity", "1e999"):
        mock_upstream.script(call("apply_credit", {"customer_id": "c1", "amount": amount}))
        r = post(lp, SUPPORT_KEY, body(tools=[tool("apply_credit")]))
        assert r.status_code == 200, r.text
        msg = r.json()["choices"][0]["message"]
        assert not msg.get("tool_calls"), (amount, msg)
        assert "held:apply_credit" in actions(r) and r.headers.get("x-guardproxy-approval-id"), amount


def test_non_finite_amount_is_held_in_a_stream(lp: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script(call("apply_credit", {"customer_id": "c1", "amount": "NaN"}))
    _, data = sse(lp, SUPPORT_KEY, body(tools=[tool("apply_credit")]))
    assert b"tool_calls" not in data and b"NaN" not in data


def test_ordinary_strings_and_small_amounts_still_pass(lp: Proxy, mock_upstream: Mock) -> None:
    """Guard for the fix above: only a conversion to double errors (a customer named "Nan" is fine)."""
    mock_upstream.script(call("apply_credit", {"customer_id": "Nan", "amount": "20"}))
    r = post(lp, SUPPORT_KEY, body(tools=[tool("apply_credit")]))
    (tc,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert json.loads(tc["function"]["arguments"]) == {"customer_id": "Nan", "amount": "20"}
    # ... and a NaN amount right after is still held.
    mock_upstream.script(call("apply_credit", {"customer_id": "Nan", "amount": "nan"}))
    r = post(lp, SUPPORT_KEY, body(tools=[tool("apply_credit")]))
    assert "held:apply_credit" in actions(r)


# --- 18: every forcing field -----------------------------------------------------------------------------


def test_function_call_forcing_a_blocked_function_beside_a_dict_tool_choice(lp: Proxy, mock_upstream: Mock) -> None:
    before = len(mock_upstream.calls())
    r = post(lp, SUPPORT_KEY, body(
        tools=[tool("get_customer_account")],
        tool_choice={"type": "function", "function": {"name": "get_customer_account"}},
        function_call={"name": "delete_account"}))
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("tool_not_allowed", "function_call")
    assert len(mock_upstream.calls()) == before


def test_allowed_tools_choice_naming_a_blocked_tool_is_refused(lp: Proxy, mock_upstream: Mock) -> None:
    before = len(mock_upstream.calls())
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "get_customer_account"}},
        {"type": "function", "function": {"name": "delete_account"}}]}}
    r = post(lp, SUPPORT_KEY, body(tools=[tool("get_customer_account")], tool_choice=choice))
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("tool_not_allowed", "tool_choice")
    assert "delete_account" in err["message"]
    assert len(mock_upstream.calls()) == before


# --- case in tool names ----------------------------------------------------------------------------------


def test_deny_glob_is_case_insensitive_on_offered_tools(lp: Proxy, mock_upstream: Mock) -> None:
    mock_upstream.script({"content": "ok"})
    r = post(lp, SANDBOX_KEY, body(tools=[tool("Delete_account"), tool("DELETE_ACCOUNT"), tool("lookup")]))
    assert r.status_code == 200, r.text
    assert sent_tools(mock_upstream) == ["lookup"]
    assert {"tool_stripped:Delete_account", "tool_stripped:DELETE_ACCOUNT"} <= set(actions(r))
    # The other direction: allow entries stay case-exact.
    mock_upstream.script({"content": "ok"})
    r = post(lp, SUPPORT_KEY, body(tools=[tool("Apply_Credit"), tool("apply_credit")]))
    assert sent_tools(mock_upstream) == ["apply_credit"] and "tool_stripped:Apply_Credit" in actions(r)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_deny_glob_is_case_insensitive_on_returned_calls(lp: Proxy, mock_upstream: Mock, stream: bool) -> None:
    script = call("DELETE_Account", {"customer_id": "c-secret-9"})
    mock_upstream.script(script)
    if stream:
        _, data = sse(lp, SANDBOX_KEY, body(tools=[tool("lookup")]))
        assert b"tool_calls" not in data and b"c-secret-9" not in data
    else:
        r = post(lp, SANDBOX_KEY, body(tools=[tool("lookup")]))
        msg = r.json()["choices"][0]["message"]
        assert not msg.get("tool_calls") and msg["content"].startswith(MARK)
        assert "tool_denied:DELETE_Account" in actions(r)
    # The other direction: Apply_Credit is not the allowed apply_credit.
    mock_upstream.script(call("Apply_Credit", {"customer_id": "c1", "amount": 1}))
    r = post(lp, SUPPORT_KEY, body(tools=[tool("apply_credit")]))
    assert not r.json()["choices"][0]["message"].get("tool_calls")
    assert "tool_denied:Apply_Credit" in actions(r)


# --- 7: team identity is (org, team) ---------------------------------------------------------------------


def test_match_teams_is_scoped_by_org(lp: Proxy, mock_upstream: Mock) -> None:
    offered = [tool("alpha_tool"), tool("beta_tool"), tool("gamma_tool")]
    mock_upstream.script({"content": "ok"})
    r = post(lp, DEFAULT_SUPPORT_KEY, body(tools=offered))
    assert r.status_code == 200, r.text
    assert sent_tools(mock_upstream) == ["beta_tool", "gamma_tool"]  # support-default applies, not acme's
    mock_upstream.script({"content": "ok"})
    r = post(lp, ACME_SUPPORT_KEY, body(tools=offered))
    assert r.status_code == 200, r.text
    assert sent_tools(mock_upstream) == ["alpha_tool", "gamma_tool"]  # acme/support applies, not default's
