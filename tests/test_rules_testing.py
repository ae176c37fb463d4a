"""rules.testing in process: case parsing, judging request and response cases, and diff rendering;
plus the bound on rules.effective's tool_blocked memo."""

from __future__ import annotations

from typing import Any

import pytest
from policy_builders import policy
from pydantic import TypeAdapter

from rules.compiler import CompiledPolicySet, compile_policies
from rules.loader import load_policies
from rules.testing import Case, CaseResult, judge, parse_cases, render, render_diff
from rules.yamlsrc import load_yaml

ORG = policy("org", """models:
  allow: [gpt-4o-mini]
  params:
    temperature: {max: 1.0}
tools:
  default: allow
  deny: ['delete_*']
""", "{all: true}")

AGENT = policy("agent", """tools:
  default: deny
  allow:
    lookup: {}
    pinned:
      schema:
        type: object
        required: [id]
        properties: {id: {type: string}}
output:
  rules:
    - id: low-confidence
      when: "has(output.confidence) && output.confidence < 0.75"
      action: rewrite
      set: {review: true}
""", "{keys: [k1]}")

CASE = TypeAdapter(Case)


@pytest.fixture(scope="module")
def compiled() -> CompiledPolicySet:
    loaded = load_policies([("org.yaml", ORG), ("agent.yaml", AGENT)])
    assert loaded.errors == []
    cps, errors = compile_policies(loaded.policies)
    assert errors == [] and cps is not None
    return cps


def run(compiled: CompiledPolicySet, case: dict[str, Any]) -> CaseResult:
    return judge(compiled, CASE.validate_python({"name": "c", "principal": {"key": "k1"}, **case}))


def response_case(response: dict[str, Any], expect: dict[str, Any]) -> dict[str, Any]:
    return {"response": {"model": "gpt-4o-mini", **response}, "expect": expect}


# --- parse_cases --------------------------------------------------------------------------------


def test_parse_cases_locates_cases_and_flags_duplicate_names() -> None:
    text = """cases:
  - name: a
    principal: {key: k1}
    request: {model: gpt-4o-mini, messages: []}
    expect: {decision: allow}
  - name: a
    principal: {key: k1}
    response: {content: hi}
    expect: {decision: allow}
"""
    cases, errors = parse_cases(load_yaml(text, "f.yaml"))
    assert [(c.case.name, c.source, c.line) for c in cases] == [("a", "f.yaml", 2), ("a", "f.yaml", 6)]
    assert [(e.source, e.line, e.path, e.message) for e in errors] == [
        ("f.yaml", 6, "cases[1].name", "duplicate case name 'a'")]


def test_parse_cases_rejects_non_mapping_file() -> None:
    cases, errors = parse_cases(load_yaml("- just a list\n", "f.yaml"))
    assert cases == []
    assert [(e.line, e.message) for e in errors] == [(1, "a case file must be a mapping with a cases: list")]


def test_parse_cases_names_missing_field_and_ambiguous_kind() -> None:
    text = """cases:
  - name: no expect
    principal: {key: k1}
    request: {model: m}
  - name: both kinds
    principal: {key: k1}
    request: {model: m}
    response: {content: hi}
    expect: {decision: allow}
"""
    cases, errors = parse_cases(load_yaml(text, "f.yaml"))
    assert cases == []
    messages = [e.message for e in errors]
    assert "missing required field 'expect'" in messages
    assert any("exactly one of request: or response:" in m for m in messages)


# --- request cases ------------------------------------------------------------------------------


def test_request_case_lists_legacy_functions_kept_after_stripping(compiled: CompiledPolicySet) -> None:
    req = {"model": "gpt-4o-mini", "messages": [],
           "functions": [{"name": "lookup", "parameters": {}}, {"name": "wire_transfer", "parameters": {}}]}
    res = run(compiled, {"request": req, "expect": {"decision": "modify", "tools": ["lookup"]}})
    assert res.passed
    assert res.full["tools"] == ["lookup"]
    assert res.full["actions"] == ["tool_stripped:wire_transfer"]
    # tools compare in order and exactly: an extra expected name fails.
    res = run(compiled, {"request": req, "expect": {"decision": "modify", "tools": ["lookup", "wire_transfer"]}})
    assert not res.passed and res.actual["tools"] == ["lookup"]


def test_request_case_params_project_only_listed_fields(compiled: CompiledPolicySet) -> None:
    req = {"model": "gpt-4o-mini", "temperature": 1.5, "top_p": 0.5, "messages": [{"role": "user", "content": "x"}]}
    res = run(compiled, {"request": req, "expect": {"decision": "modify", "params": {"temperature": 1.0}}})
    assert res.passed
    assert res.actual == {"decision": "modify", "params": {"temperature": 1.0}}
    assert res.full["params"] == {"model": "gpt-4o-mini", "temperature": 1.0, "top_p": 0.5}
    # A listed parameter the body lacks shows as null, and `true` is not `1`.
    res = run(compiled, {"request": req, "expect": {"decision": "modify", "params": {"seed": 1, "top_p": True}}})
    assert not res.passed
    assert res.actual["params"] == {"seed": None, "top_p": 0.5}


def test_request_case_sets_compare_unordered(compiled: CompiledPolicySet) -> None:
    req = {"model": "gpt-4o-mini", "messages": [],
           "tools": [{"type": "function", "function": {"name": n}} for n in ("delete_x", "other", "lookup")]}
    actions = ["tool_stripped:other", "tool_stripped:delete_x"]
    res = run(compiled, {"request": req, "expect": {"decision": "modify", "actions": actions}})
    assert res.passed and res.actual["actions"] == actions  # shown in the expected order
    res = run(compiled, {"request": req, "expect": {"decision": "modify", "actions": actions[:1]}})
    assert not res.passed and sorted(res.actual["actions"]) == sorted(actions)


def test_denied_request_has_code_and_no_tools(compiled: CompiledPolicySet) -> None:
    res = run(compiled, {"request": {"model": "o1", "messages": [], "tools": [{"function": {"name": "lookup"}}]},
                         "expect": {"decision": "deny", "code": "model_not_allowed", "tools": []}})
    assert res.passed and res.full["rule_ids"] == ["org:models.allow"]


# --- response cases -----------------------------------------------------------------------------


def test_declared_request_tool_schema_validates_unpinned_calls(compiled: CompiledPolicySet) -> None:
    # Both OpenAI's {type, function} form and a bare function are accepted.
    declared = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "required": ["q"]}}}]
    expect = {"decision": "deny", "calls": [{"name": "lookup", "verdict": "invalid"}]}
    res = run(compiled, response_case({"tool_calls": [{"name": "lookup", "arguments": {}}],
                                       "request_tools": declared}, expect))
    assert res.passed, (res.expected, res.actual)
    assert res.full["calls"][0]["rule_id"] == "lookup:schema"
    bare = [{"name": "lookup", "parameters": {"type": "object", "required": ["q"]}}]
    res = run(compiled, response_case({"tool_calls": [{"name": "lookup", "arguments": "{}"}],
                                       "request_tools": bare}, expect))
    assert res.passed, (res.expected, res.actual)


def test_pinned_schema_wins_over_declared_and_malformed_declarations_are_skipped(
        compiled: CompiledPolicySet) -> None:
    # The request declares `pinned` with an impossible schema; the policy's pinned schema is used instead.
    declared: list[dict[str, Any]] = [
        {"type": "function", "function": {"name": "pinned", "parameters": {"not": {}}}},
        {"type": "function", "function": {"name": "lookup"}},  # no parameters: nothing to validate
        {"type": "function", "function": "not a mapping"},
        {"name": 7, "parameters": {"not": {}}},
    ]
    res = run(compiled, response_case({
        "tool_calls": [{"name": "pinned", "arguments": {"id": "a"}}, {"name": "lookup", "arguments": {"q": 1}}],
        "request_tools": declared,
    }, {"decision": "allow", "calls": [{"name": "pinned", "verdict": "allow"},
                                        {"name": "lookup", "verdict": "allow"}]}))
    assert res.passed, (res.expected, res.actual)


def test_case_with_invalid_declared_schema_fails_with_error(compiled: CompiledPolicySet) -> None:
    res = run(compiled, response_case({"tool_calls": [{"name": "lookup"}], "request_tools": [
        {"name": "lookup", "parameters": {"type": "no-such-type"}}]}, {"decision": "allow"}))
    assert not res.passed
    assert res.full["decision"] == "error"
    assert res.actual == {"error": res.full["error"]}
    assert res.full["error"].startswith("case declares an invalid schema: invalid JSON schema")


def test_case_with_invalid_response_format_schema_fails_with_error(compiled: CompiledPolicySet) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"minimum": "zero"}}}
    res = run(compiled, response_case({"content": "{}", "response_format": rf}, {"decision": "allow"}))
    assert not res.passed and "case declares an invalid schema" in res.actual["error"]


def test_response_format_schema_judges_content(compiled: CompiledPolicySet) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": ["a"]}}}
    res = run(compiled, response_case({"content": {"b": 1}, "response_format": rf},
                                      {"decision": "modify", "output": {"verdict": "invalid"}}))
    assert res.passed, (res.expected, res.actual)  # invalid output is repaired, not denied
    assert res.full["errors"] == ['/: "a" is a required property']


def test_output_without_content_contains_projects_verdict_only(compiled: CompiledPolicySet) -> None:
    res = run(compiled, response_case({"content": {"confidence": 0.5}},
                                      {"decision": "modify", "output": {"verdict": "rewrite"}}))
    assert res.passed
    assert res.actual["output"] == {"verdict": "rewrite"}
    assert res.full["output"] == {"verdict": "rewrite", "content": {"confidence": 0.5, "review": True}}


def test_content_contains_reads_rewritten_json_and_marks_absent_keys(compiled: CompiledPolicySet) -> None:
    expect = {"decision": "modify", "output": {"verdict": "rewrite", "content_contains": {"review": True, "z": 1}}}
    res = run(compiled, response_case({"content": {"confidence": 0.5}}, expect))
    assert not res.passed
    assert res.actual["output"]["content_contains"] == {"review": True, "z": "<missing>"}


def test_plain_text_content_has_no_fields(compiled: CompiledPolicySet) -> None:
    expect = {"decision": "allow", "output": {"verdict": "allow", "content_contains": {"a": 1}}}
    res = run(compiled, response_case({"content": "not json {"}, expect))
    assert res.full["output"] == {"verdict": "allow", "content": "not json {"}
    assert res.actual["output"] == {"verdict": "allow", "content_contains": {"a": "<missing>"}}
    assert not res.passed


def test_no_content_is_null(compiled: CompiledPolicySet) -> None:
    res = run(compiled, response_case({"tool_calls": [{"name": "lookup"}]}, {"decision": "allow"}))
    assert res.passed and res.full["output"] == {"verdict": "allow", "content": None}


def test_calls_beyond_the_expected_list_show_name_and_verdict(compiled: CompiledPolicySet) -> None:
    res = run(compiled, response_case(
        {"tool_calls": [{"name": "lookup"}, {"name": "delete_all"}]},
        {"decision": "modify", "calls": [{"name": "lookup", "verdict": "allow", "rule_id": None}]}))
    assert not res.passed
    assert res.actual["calls"] == [{"name": "lookup", "verdict": "allow"},
                                   {"name": "delete_all", "verdict": "deny"}]


# --- rendering ----------------------------------------------------------------------------------


def test_render_diff_marks_expected_and_actual_lines() -> None:
    lines = render_diff({"decision": "allow", "tools": ["a", "b"]}, {"decision": "deny", "tools": ["a", "b"]})
    assert lines[:2] == ["--- expected", "+++ actual"]
    assert "-decision: allow" in lines and "+decision: deny" in lines
    assert " - a" in lines and " - b" in lines  # unchanged lines are context
    assert render_diff({"a": 1}, {"a": 1}) == []


def test_render_keeps_key_order_and_unicode() -> None:
    assert render({"z": "é", "a": {"b": [1]}}) == ["z: é", "a:", "  b:", "  - 1"]


# --- rules.effective ----------------------------------------------------------------------------


def test_tool_blocked_memo_is_bounded(compiled: CompiledPolicySet) -> None:
    eff = compiled.for_principal("k-memo", None)  # org only: delete_* is blocked
    for i in range(4100):
        enforced, shadow = eff.tool_blocked(f"tool_{i}")
        assert enforced is None and shadow is None
    assert len(eff._blocked) == 4096
    # Past the bound, answers are still computed, just not remembered.
    enforced, _ = eff.tool_blocked("delete_me")
    assert enforced is not None and enforced.policy == "org"
    assert "delete_me" not in eff._blocked
