"""rules.evaluate (request side) and rules.effective (layering), driven from policy YAML."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from policy_builders import compiled, policy

from rules.decision import RequestDecision, Trail
from rules.effective import Effective, build_effective
from rules.evaluate import Principal, evaluate_request, printable_name, valid_tool_name

P = Principal("k1", "t1")


def eff_of(*docs: str) -> Effective:
    return compiled(*docs).for_principal("k1", "t1")


def run(eff: Effective, body: dict[str, Any]) -> RequestDecision:
    before = copy.deepcopy(body)
    d = evaluate_request(eff, body, P, now=0.0)
    assert body == before, "the request body must never be mutated in place"
    assert d.revision == eff.revision
    return d


def tool(name: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


def names(body: dict[str, Any] | None, field: str = "tools") -> list[Any]:
    assert body is not None
    if field == "tools":
        return [t["function"]["name"] for t in body.get("tools", [])]
    return [f["name"] for f in body.get("functions", [])]


MODELS = policy("org", "models:\n  allow: [a, b]\n")


# --- models --------------------------------------------------------------------


def test_model_not_allowed_is_refused() -> None:
    d = run(eff_of(MODELS), {"model": "z", "messages": []})
    assert d.effect == "deny" and d.body is None
    assert d.refusal is not None
    assert (d.refusal.code, d.refusal.rule_id, d.refusal.param) == ("model_not_allowed", "org:models.allow", "model")
    assert d.refusal.message == "model 'z' is not allowed by policy org"
    assert d.actions == ("refused:model_not_allowed",) and d.rule_ids == ("org:models.allow",)
    assert d.reasons == (d.refusal.message,)


def test_model_allowlists_intersect() -> None:
    eff = eff_of(MODELS, policy("key", "models:\n  allow: [b, c]\n", match="{keys: [k1]}"))
    assert run(eff, {"model": "b"}).effect == "allow"
    ra, rc = run(eff, {"model": "a"}).refusal, run(eff, {"model": "c"}).refusal
    assert ra is not None and ra.rule_id == "key:models.allow"
    assert rc is not None and rc.rule_id == "org:models.allow"


def test_missing_model_is_refused_when_there_is_an_allowlist() -> None:
    assert run(eff_of(MODELS), {"messages": []}).effect == "deny"
    assert run(eff_of(policy("open")), {"messages": []}).effect == "allow"


def test_shadow_model_gate_reports_would_and_allows() -> None:
    eff = eff_of(policy("s", "models:\n  allow: [a]\n", mode="shadow"))
    d = run(eff, {"model": "z"})
    assert d.effect == "allow" and d.refusal is None
    assert d.would == ("would_deny_model:z",) and d.actions == () and d.reasons == ()
    assert d.rule_ids == ("s:models.allow",)


# --- tools ----------------------------------------------------------------------

ALLOW = policy("key", "tools:\n  default: deny\n  allow:\n    lookup: {}\n    refund: {}\n", match="{keys: [k1]}")


def test_unchanged_body_is_the_same_object() -> None:
    body = {"model": "a", "tools": [tool("lookup")], "tool_choice": "auto", "max_tokens": 10}
    d = run(eff_of(MODELS, ALLOW), body)
    assert d.effect == "allow" and d.changed is False and d.body is body
    assert d.actions == () and d.rule_ids == ()


def test_disallowed_tools_are_stripped() -> None:
    body = {"model": "a", "tools": [tool("lookup"), tool("delete_all"), tool("refund")], "tool_choice": "auto"}
    d = run(eff_of(ALLOW), body)
    assert d.effect == "modify" and d.changed is True and d.body is not body
    assert names(d.body) == ["lookup", "refund"] and d.body is not None and d.body["tool_choice"] == "auto"
    assert d.actions == ("tool_stripped:delete_all",) and d.rule_ids == ("key:tools",)
    assert d.reasons == ("tool delete_all is not allowed",)


@pytest.mark.parametrize(
    ("bad", "label"),
    [("Apply Credit", "Apply?Credit"), ("", "<empty>"), (None, "<invalid>"), (7, "<invalid>"),
     ("a\u200bb", "a?b"), ("x" * 65, "x" * 64), ("multi_tool_use.parallel", "multi_tool_use.parallel")],
)
def test_invalid_tool_names_are_stripped_even_when_default_allow(bad: Any, label: str) -> None:
    body = {"model": "a", "tools": [tool(bad), tool("ok")]}
    d = run(eff_of(policy("open")), body)
    assert names(d.body) == ["ok"]
    assert d.actions == (f"tool_stripped:{label}",) and d.rule_ids == ("tools.invalid_name",)


def test_malformed_tool_entries_are_stripped() -> None:
    body = {"model": "a", "tools": ["nope", {"function": "x"}, tool("ok")]}
    d = run(eff_of(policy("open")), body)
    assert d.body is not None and d.body["tools"] == [tool("ok")]
    assert d.actions == ("tool_stripped:<invalid>", "tool_stripped:<invalid>")


def test_last_tool_stripped_removes_tool_choice_and_parallel_tool_calls() -> None:
    body = {"model": "a", "tools": [tool("delete_all")], "tool_choice": "auto", "parallel_tool_calls": False}
    d = run(eff_of(ALLOW), body)
    assert d.body == {"model": "a"}


def test_tool_choice_required_with_no_tool_left_is_refused() -> None:
    body = {"model": "a", "tools": [tool("delete_all")], "tool_choice": "required"}
    d = run(eff_of(ALLOW), body)
    assert d.refusal is not None
    assert (d.refusal.code, d.refusal.rule_id, d.refusal.param) == ("tool_not_allowed", "tools.required", "tool_choice")
    assert d.actions == ("tool_stripped:delete_all", "refused:tool_not_allowed")


def test_tool_choice_required_with_a_tool_left_is_fine() -> None:
    body = {"model": "a", "tools": [tool("delete_all"), tool("lookup")], "tool_choice": "required"}
    d = run(eff_of(ALLOW), body)
    assert d.effect == "modify" and d.body is not None and d.body["tool_choice"] == "required"


def test_legacy_functions_are_stripped() -> None:
    body = {"model": "a", "functions": [{"name": "lookup"}, {"name": "drop_db"}, "junk"]}
    d = run(eff_of(ALLOW), body)
    assert names(d.body, "functions") == ["lookup"]
    assert d.actions == ("tool_stripped:drop_db", "tool_stripped:<invalid>")


def test_last_function_stripped_removes_function_call() -> None:
    body = {"model": "a", "functions": [{"name": "drop_db"}], "function_call": "auto", "tool_choice": "auto"}
    d = run(eff_of(ALLOW), body)
    assert d.body == {"model": "a", "tool_choice": "auto"}


def test_tools_that_are_not_a_list_are_left_to_the_shell() -> None:
    body = {"model": "a", "tools": {"not": "a list"}, "functions": None}
    d = run(eff_of(ALLOW), body)
    assert d.body is body


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "delete_all"}}}, "tool_choice"),
        ({"function_call": {"name": "delete_all"}}, "function_call"),
    ],
)
def test_forced_disallowed_tool_is_refused(extra: dict[str, Any], param: str) -> None:
    body = {"model": "a", "tools": [tool("lookup"), tool("delete_all")], **extra}
    d = run(eff_of(ALLOW), body)
    assert d.refusal is not None
    assert (d.refusal.code, d.refusal.rule_id, d.refusal.param) == ("tool_not_allowed", "key:tools", param)
    assert d.refusal.message == f"{param} forces tool 'delete_all', which policy does not allow"


@pytest.mark.parametrize(
    "choice", [{"type": "function"}, {"type": "function", "function": {"name": "bad name"}}, {"function": "x"}]
)
def test_forced_tool_with_missing_or_invalid_name_is_refused(choice: dict[str, Any]) -> None:
    d = run(eff_of(policy("open")), {"model": "a", "tools": [tool("ok")], "tool_choice": choice})
    assert d.refusal is not None and d.refusal.rule_id == "tools.invalid_name"


def test_forced_allowed_tool_passes() -> None:
    body = {"model": "a", "tools": [tool("lookup")],
            "tool_choice": {"type": "function", "function": {"name": "lookup"}}}
    assert run(eff_of(ALLOW), body).body is body
    body2 = {"model": "a", "functions": [{"name": "lookup"}], "function_call": {"name": "lookup"}}
    assert run(eff_of(ALLOW), body2).body is body2


def test_function_call_is_checked_beside_an_allowed_dict_tool_choice() -> None:
    body = {"model": "a", "tools": [tool("lookup")], "functions": [{"name": "lookup"}],
            "tool_choice": {"type": "function", "function": {"name": "lookup"}},
            "function_call": {"name": "delete_all"}}
    d = run(eff_of(ALLOW), body)
    assert d.refusal is not None
    assert (d.refusal.code, d.refusal.rule_id, d.refusal.param) == ("tool_not_allowed", "key:tools", "function_call")


def _allowed_tools(*names: str, kind: str = "function") -> dict[str, Any]:
    return {"type": "allowed_tools",
            "allowed_tools": {"mode": "required", "tools": [{"type": kind, kind: {"name": n}} for n in names]}}


@pytest.mark.parametrize("choice", [
    _allowed_tools("lookup", "delete_all"),
    _allowed_tools("delete_all", kind="custom"),
    {"type": "custom", "custom": {"name": "delete_all"}},
])
def test_every_shape_of_tool_choice_is_checked(choice: dict[str, Any]) -> None:
    d = run(eff_of(ALLOW), {"model": "a", "tools": [tool("lookup")], "tool_choice": choice})
    assert d.refusal is not None
    assert (d.refusal.code, d.refusal.rule_id, d.refusal.param) == ("tool_not_allowed", "key:tools", "tool_choice")
    assert d.refusal.message == "tool_choice forces tool 'delete_all', which policy does not allow"


def test_allowed_shapes_of_tool_choice_pass_and_malformed_ones_are_refused() -> None:
    for choice in (_allowed_tools("lookup", "refund"), _allowed_tools("lookup", kind="custom"),
                   {"type": "custom", "custom": {"name": "refund"}}):
        body = {"model": "a", "tools": [tool("lookup"), tool("refund")], "tool_choice": choice}
        assert run(eff_of(ALLOW), body).body is body, choice
    for malformed in ({"type": "allowed_tools"}, {"type": "allowed_tools", "allowed_tools": {"tools": "lookup"}},
                      _allowed_tools() | {"allowed_tools": {"tools": [{"type": "function"}]}},
                      {"type": "custom", "custom": "lookup"}):
        d = run(eff_of(ALLOW), {"model": "a", "tools": [tool("lookup")], "tool_choice": malformed})
        assert d.refusal is not None and d.refusal.rule_id == "tools.invalid_name", malformed


def test_shadow_gate_reports_every_forced_tool() -> None:
    eff = eff_of(policy("sh", "tools:\n  deny: ['risky_*']\n", mode="shadow"))
    body = {"model": "a", "tools": [tool("risky_a")], "tool_choice": _allowed_tools("risky_a", "risky_b"),
            "function_call": {"name": "risky_c"}}
    d = run(eff, body)
    assert d.refusal is None and d.body is body
    assert d.would == ("would_deny_forced_tool:risky_a", "would_deny_forced_tool:risky_b",
                       "would_deny_forced_tool:risky_c", "would_tool_stripped:risky_a")


def test_deny_globs_strip_offered_tools_in_any_case_allow_is_exact() -> None:
    org = policy("org", "tools:\n  deny: ['delete_*', drop_db]\n")
    d = run(eff_of(org), {"model": "a", "tools": [tool("Delete_account"), tool("DELETE_ACCOUNT"), tool("DROP_DB"),
                                                  tool("lookup")]})
    assert names(d.body) == ["lookup"]
    assert d.actions == ("tool_stripped:Delete_account", "tool_stripped:DELETE_ACCOUNT", "tool_stripped:DROP_DB")
    d = run(eff_of(org), {"model": "a", "tools": [tool("lookup")],
                          "tool_choice": {"type": "function", "function": {"name": "Delete_Account"}}})
    assert d.refusal is not None and d.refusal.rule_id == "org:tools"
    d = run(eff_of(ALLOW), {"model": "a", "tools": [tool("Lookup"), tool("lookup")]})
    assert names(d.body) == ["lookup"] and d.actions == ("tool_stripped:Lookup",)


def test_org_deny_glob_beats_key_allow() -> None:
    org = policy("org", "tools:\n  deny: ['delete_*']\n")
    key = policy("key", "tools:\n  default: deny\n  allow:\n    delete_user: {}\n", match="{keys: [k1]}")
    eff = eff_of(org, key)
    d = run(eff, {"model": "a", "tools": [tool("delete_user")]})
    assert d.actions == ("tool_stripped:delete_user",) and d.rule_ids == ("org:tools",)
    gate, _ = eff.tool_blocked("delete_user")
    assert gate is not None and gate.policy == "org"


def test_shadow_tool_gate_keeps_tool_and_reports_would() -> None:
    shadow = policy("sh", "tools:\n  deny: ['risky']\n", mode="shadow")
    eff = eff_of(shadow)
    d = run(eff, {"model": "a", "tools": [tool("risky")], "tool_choice": {"function": {"name": "risky"}}})
    assert d.effect == "allow" and d.refusal is None
    assert d.would == ("would_deny_forced_tool:risky", "would_tool_stripped:risky")
    assert d.rule_ids == ("sh:tools",) and d.actions == ()


def test_enforced_and_shadow_gate_both_blocking() -> None:
    eff = eff_of(policy("sh", "tools:\n  deny: ['x']\n", mode="shadow"), policy("en", "tools:\n  deny: ['x']\n"))
    enforced, shadow = eff.tool_blocked("x")
    assert enforced is not None and enforced.policy == "en"
    assert shadow is not None and shadow.policy == "sh"
    assert eff.tool_blocked("y") == (None, None)
    d = run(eff, {"model": "a", "tools": [tool("x")]})
    assert d.actions == ("tool_stripped:x",) and d.would == ()


# --- parameters -------------------------------------------------------------------

LIMITS = policy("org", """models:
  params:
    temperature: {min: 0.1, max: 1.0}
    max_tokens: {max: 4096}
    top_p: {max: 0.9}
""")
KEY_LIMITS = policy("key", """models:
  params:
    temperature: {max: 0.2}
    max_completion_tokens: {max: 1000.5, min: 16}
""", match="{keys: [k1]}")


def test_clamps_to_max_and_min() -> None:
    eff = eff_of(LIMITS)
    d = run(eff, {"model": "a", "temperature": 1.7, "max_tokens": 100})
    assert d.body is not None and d.body["temperature"] == 1.0
    assert d.actions == ("clamped:temperature",) and d.rule_ids == ("org:models.params.temperature",)
    d = run(eff, {"model": "a", "temperature": 0.0, "max_tokens": 100})
    assert d.body is not None and d.body["temperature"] == 0.1


def test_absent_max_tokens_is_set_other_absent_params_are_not() -> None:
    d = run(eff_of(LIMITS), {"model": "a"})
    assert d.body == {"model": "a", "max_tokens": 4096}
    assert isinstance(d.body["max_tokens"], int)
    assert d.actions == ("clamped:max_tokens",)


def test_min_of_param_max_across_policies() -> None:
    eff = eff_of(LIMITS, KEY_LIMITS)
    d = run(eff, {"model": "a", "temperature": 0.5})
    assert d.body is not None and d.body["temperature"] == 0.2
    assert d.rule_ids == ("key:models.params.temperature", "key:models.params.max_completion_tokens")
    # Both token names are one limit: the lowest max (key's, floored) is added under the name key uses.
    assert d.body["max_completion_tokens"] == 1000 and isinstance(d.body["max_completion_tokens"], int)
    assert "max_tokens" not in d.body
    d = run(eff, {"model": "a", "max_tokens": 5000})
    assert d.body is not None and d.body["max_tokens"] == 1000 and "max_completion_tokens" not in d.body
    assert d.rule_ids == ("key:models.params.max_completion_tokens",)


def test_max_completion_tokens_alias_is_clamped() -> None:
    d = run(eff_of(LIMITS), {"model": "a", "max_completion_tokens": 9000})
    assert d.body == {"model": "a", "max_completion_tokens": 4096}
    d = run(eff_of(LIMITS), {"model": "a", "max_completion_tokens": 9000, "max_tokens": 5000})
    assert d.body is not None and (d.body["max_completion_tokens"], d.body["max_tokens"]) == (4096, 4096)


def test_token_min_rounds_up() -> None:
    d = run(eff_of(KEY_LIMITS), {"model": "a", "max_completion_tokens": 3})
    assert d.body is not None and d.body["max_completion_tokens"] == 16
    assert isinstance(d.body["max_completion_tokens"], int)
    frac = policy("f", "models:\n  params:\n    max_tokens: {min: 10.5}\n")
    d = run(eff_of(frac), {"model": "a", "max_tokens": 3})
    assert d.body is not None and d.body["max_tokens"] == 11


def test_ints_stay_ints_unless_the_limit_is_fractional() -> None:
    d = run(eff_of(LIMITS), {"model": "a", "temperature": 2, "max_tokens": 10})
    assert d.body is not None and d.body["temperature"] == 1 and isinstance(d.body["temperature"], int)
    d = run(eff_of(LIMITS), {"model": "a", "temperature": 0, "max_tokens": 10})
    # 0 -> 0.1: the min must hold, so the int becomes a float rather than being truncated back to 0.
    assert d.body is not None and d.body["temperature"] == 0.1
    d = run(eff_of(LIMITS), {"model": "a", "top_p": 1.5, "max_tokens": 10})
    assert d.body is not None and d.body["top_p"] == 0.9


@pytest.mark.parametrize("value", ["hot", True, None, [1], {"v": 1}])
def test_non_numbers_are_left_alone(value: Any) -> None:
    body = {"model": "a", "temperature": value, "max_tokens": 5}
    assert run(eff_of(LIMITS), body).body is body


def test_values_in_range_are_untouched() -> None:
    body = {"model": "a", "temperature": 0.5, "max_tokens": 4096, "top_p": 0.9}
    assert run(eff_of(LIMITS), body).body is body


def test_shadow_limit_reports_would_and_keeps_value() -> None:
    sh = policy("sh", "models:\n  params:\n    temperature: {max: 0.3}\n    max_tokens: {max: 5}\n", mode="shadow")
    body = {"model": "a", "temperature": 0.9, "max_tokens": 100}
    d = run(eff_of(sh), body)
    assert d.body is body and d.effect == "allow"
    assert d.would == ("would_clamped:temperature", "would_clamped:max_tokens")
    assert d.rule_ids == ("sh:models.params.temperature", "sh:models.params.max_tokens")
    # Absent max_tokens: the shadow policy would have set it.
    d = run(eff_of(sh), {"model": "a"})
    assert d.would == ("would_clamped:max_tokens",)


def test_enforced_clamp_then_shadow_sees_the_clamped_value() -> None:
    sh = policy("sh", "models:\n  params:\n    temperature: {max: 0.5}\n", mode="shadow",
                match="{keys: [k1]}")
    d = run(eff_of(LIMITS, sh), {"model": "a", "temperature": 1.5, "max_tokens": 1})
    assert d.body is not None and d.body["temperature"] == 1.0
    assert d.would == ("would_clamped:temperature",)
    d = run(eff_of(LIMITS, sh), {"model": "a", "temperature": 0.4, "max_tokens": 1})
    assert d.would == ()


def test_shadow_limit_is_judged_against_the_combined_enforced_value() -> None:
    sh = policy("sh", "models:\n  params:\n    temperature: {max: 0.5}\n", mode="shadow")
    key = policy("key", "models:\n  params:\n    temperature: {max: 0.3}\n", match="{keys: [k1]}")
    d = run(eff_of(sh, key), {"model": "a", "temperature": 0.9})
    assert d.body is not None and d.body["temperature"] == 0.3
    assert d.would == () and d.rule_ids == ("key:models.params.temperature",)
    # Two shadow limits that would both move it: one finding, both rule ids.
    sh2 = policy("sh2", "models:\n  params:\n    temperature: {max: 0.2}\n", mode="shadow", match="{keys: [k1]}")
    d = run(eff_of(sh, key, sh2), {"model": "a", "temperature": 0.9})
    assert d.would == ("would_clamped:temperature",)
    assert d.rule_ids == ("key:models.params.temperature", "sh2:models.params.temperature")


def test_contradicting_limits_clamp_once_and_the_broader_max_wins() -> None:
    """The load refuses such a set; combined anyway, the value is clamped once and stays under the org max."""
    org = compiled(policy("org", "models:\n  params:\n    temperature: {max: 1.0}\n    max_tokens: {max: 256}\n"))
    team = compiled(policy("team", "models:\n  params:\n    temperature: {min: 1.9}\n    max_tokens: {min: 4000}\n",
                           match="{teams: [t1]}"))
    eff = build_effective(org.policies + team.policies, "r")
    d = evaluate_request(eff, {"model": "a", "temperature": 1.9, "max_tokens": 4000}, P, now=0.0)
    assert d.body is not None and (d.body["temperature"], d.body["max_tokens"]) == (1.0, 256)
    assert d.rule_ids == ("org:models.params.temperature", "org:models.params.max_tokens")
    d = evaluate_request(eff, {"model": "a", "temperature": 0.5, "max_tokens": 100}, P, now=0.0)
    assert d.body is not None and (d.body["temperature"], d.body["max_tokens"]) == (1.0, 256)
    body = {"model": "a", "temperature": 1.0, "max_tokens": 256}  # raised, then lowered back: unchanged
    d = evaluate_request(eff, body, P, now=0.0)
    assert d.body is body and d.actions == () and d.rule_ids == ()


def test_same_rule_recorded_once_for_both_token_fields() -> None:
    d = run(eff_of(LIMITS), {"model": "a", "max_tokens": 9000, "max_completion_tokens": 9000})
    assert d.rule_ids == ("org:models.params.max_tokens",)
    assert d.actions == ("clamped:max_tokens", "clamped:max_completion_tokens")


# --- helpers and effective -------------------------------------------------------------


def test_principal_as_cel() -> None:
    assert Principal("k").as_cel() == {"key": "k", "team": "", "org": "default"}
    assert Principal("k", "t", "o").as_cel() == {"key": "k", "team": "t", "org": "o"}


def test_valid_tool_name() -> None:
    assert valid_tool_name("get_customer-2")
    for bad in ("", "a b", "a.b", "x" * 65, None, 3, "é", "Apply_Credit "):
        assert not valid_tool_name(bad)


def testprintable_name() -> None:
    assert printable_name("a,b c") == "a?b?c"
    assert printable_name("ok") == "ok"


def test_trail_shadow_reasons_are_not_recorded() -> None:
    t = Trail()
    t.act("x", "r", "why", shadow=True)
    t.act("y", "r", "why")
    t.act("z", None, None)
    assert (t.would, t.actions, t.rule_ids, t.reasons) == (["would_x"], ["y", "z"], ["r"], ["why"])


def test_effective_combination() -> None:
    org = policy("org", "on_store_error: fail_open\ncost: {per_request_usd: 1}\n")
    team = policy("team", """tools:
  escalate_to: team_human
  allow:
    once_tool: {once_per_conversation: true}
    team_human: {}
output:
  deny_patterns: [{id: p1, regex: 'x'}]
""", match="{teams: [t1]}")
    key = policy("key", """tools:
  escalate_to: key_human
  allow:
    key_human: {}
    also_once: {once_per_conversation: true}
cost: {per_request_usd: 0.5}
""", match="{keys: [k1]}")
    shadow = policy("sh", """on_store_error: fail_closed
tools:
  escalate_to: shadow_human
  allow:
    sh_once: {once_per_conversation: true}
    shadow_human: {}
cost: {per_request_usd: 0.01}
output:
  schema: {type: object}
""", match="{keys: [k1]}", mode="shadow")
    eff = eff_of(org, team, key, shadow)
    assert eff.policy_names == ("org", "team", "key", "sh")
    assert eff.escalate_to == "key_human"  # the most specific enforcing policy names it
    assert eff.once_tools == frozenset({"once_tool", "also_once"})
    assert eff.cost is not None and eff.cost.per_request == 500_000
    assert eff.inspects_output and len(eff.output_schemas) == 1 and len(eff.deny_patterns) == 1
    assert eff.fail_open is False  # team and key default to fail_closed
    assert eff_of(org).fail_open is True
    assert eff_of(org, shadow).fail_open is True  # a shadow policy does not close anything
    assert compiled(org).for_principal("nobody", None).fail_open is True
    empty = compiled(team).for_principal("nobody", None)
    assert empty.policy_names == () and empty.fail_open is False and empty.cost is None
    assert not empty.inspects_output and empty.escalate_to is None
