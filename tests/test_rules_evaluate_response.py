"""rules.evaluate_response: tool calls and assistant content checked against compiled policies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from policy_builders import compiled
from policy_builders import policy as policy_text

from rules.compiler import compile_policies
from rules.decision import ResponseDecision, ToolCallIn
from rules.effective import Effective
from rules.evaluate import Principal
from rules.evaluate_response import ResponseContext, evaluate_response
from rules.loader import load_policies
from rules.schemas import compile_schema

P = Principal("k1", "t1")


def policy(name: str, body: str = "", match: str = "{keys: [k1]}", mode: str = "enforce") -> str:
    return policy_text(name, body, match, mode)


def eff_of(*docs: str) -> Effective:
    return compiled(*docs).for_principal("k1", "t1")


def call(name: str, args: Any = None, raw: str | None = None, index: int = 0) -> ToolCallIn:
    text = raw if raw is not None else orjson.dumps(args if args is not None else {}).decode()
    return ToolCallIn(index, f"call_{index}", name, text)


def ctx(**kw: Any) -> ResponseContext:
    return ResponseContext(P, "gpt-4o", **kw)


def run(eff: Effective, calls: Sequence[ToolCallIn] = (), content: str | None = None,
        context: ResponseContext | None = None) -> ResponseDecision:
    d = evaluate_response(eff, calls, content, context or ctx(), now=0.0)
    assert d.revision == eff.revision
    return d


ORG = policy("org", "tools:\n  deny: ['delete_*']\n", match="{all: true}")
SUPPORT = policy("support", """tools:
  default: deny
  escalate_to: escalate_to_human
  allow:
    escalate_to_human: {}
    lookup: {}
    apply_credit:
      once_per_conversation: true
      max_repairs: 2
      schema:
        type: object
        required: [customer_id, amount]
        properties:
          customer_id: {type: string}
          amount: {type: number}
        additionalProperties: false
      rules:
        - {id: deny-huge, when: "double(args.amount) > 1000.0", action: deny, reason: too much}
        - {id: approve-mid, when: "double(args.amount) > 100.0", action: require_approval}
        - {id: escalate-50, when: "double(args.amount) > 50.0", action: escalate, reason: over 50}
        - {id: allow-small, when: "double(args.amount) <= 50.0", action: allow}
        - {id: watch, when: "args.customer_id == 'vip'", action: deny, mode: shadow}
""")


@pytest.fixture(scope="module")
def support() -> Effective:
    return eff_of(ORG, SUPPORT)


def credit(amount: float, cid: str = "c1") -> ToolCallIn:
    return call("apply_credit", {"customer_id": cid, "amount": amount})


# --- names --------------------------------------------------------------------------


def test_allowed_call(support: Effective) -> None:
    d = run(support, [call("lookup", {"id": 1})])
    (v,) = d.calls
    assert (v.verdict, v.args, v.once) == ("allow", {"id": 1}, False)
    assert v.args_hash is not None and len(v.args_hash) >= 16
    assert d.effect == "allow" and d.actions == () and d.output is None


def test_args_hash_ignores_key_order(support: Effective) -> None:
    a = run(support, [call("lookup", raw='{"a":1,"b":2}')]).calls[0].args_hash
    b = run(support, [call("lookup", raw='{"b":2, "a":1}')]).calls[0].args_hash
    c = run(support, [call("lookup", raw='{"b":3, "a":1}')]).calls[0].args_hash
    assert a == b != c


@pytest.mark.parametrize(
    "name",
    ["apply_credit ", "apply\u200bcredit", "\u0430pply_credit", "\uff41pply_credit", "multi_tool_use.parallel",
     "", "apply-credit\n", "x" * 65],
)
def test_bypass_names_are_denied_as_invalid(support: Effective, name: str) -> None:
    d = run(support, [call(name, {"customer_id": "c", "amount": 1})])
    (v,) = d.calls
    assert (v.verdict, v.rule_id) == ("deny", "tools.invalid_name")
    assert d.effect == "deny" and d.rule_ids == ("tools.invalid_name",)
    assert d.actions[0].startswith("tool_denied:")
    assert all(ch.isascii() and ch.isprintable() and ch != " " for ch in d.actions[0])


def test_case_variant_is_a_different_tool_and_denied(support: Effective) -> None:
    d = run(support, [call("Apply_Credit", {"customer_id": "c", "amount": 1})])
    (v,) = d.calls
    assert (v.verdict, v.rule_id) == ("deny", "support:tools")
    assert v.reason == "tool Apply_Credit is not allowed by policy support"
    assert d.actions == ("tool_denied:Apply_Credit",)


def test_org_deny_glob_beats_key_allow() -> None:
    key = policy("key", "tools:\n  default: deny\n  allow:\n    delete_user: {}\n")
    d = run(eff_of(ORG, key), [call("delete_user")])
    assert d.calls[0].verdict == "deny" and d.calls[0].rule_id == "org:tools"


def test_shadow_gate_reports_would_and_allows() -> None:
    sh = policy("sh", "tools:\n  default: deny\n", mode="shadow")
    d = run(eff_of(sh), [call("anything")])
    assert d.calls[0].verdict == "allow" and d.effect == "allow"
    assert d.would == ("would_tool_denied:anything",) and d.rule_ids == ("sh:tools",)


# --- arguments ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [("{not json", "invalid"), ('{"amount": 1, "amount": 500}', "duplicate"), ('{"amount": NaN}', "")],
)
def test_bad_argument_json_is_invalid(support: Effective, raw: str, reason: str) -> None:
    d = run(support, [call("apply_credit", raw=raw)])
    (v,) = d.calls
    assert (v.verdict, v.rule_id) == ("invalid", "apply_credit:arguments")
    assert v.on_invalid == "repair" and v.max_repairs == 2  # from the pinned schema's policy
    assert reason in v.reason and v.errors == (v.reason,) and v.reason.startswith("arguments: ")
    assert d.errors == (f"apply_credit: {v.reason}",)
    assert d.effect == "deny"


def test_bad_argument_json_without_pinned_schema_is_denied(support: Effective) -> None:
    (v,) = run(support, [call("lookup", raw='{"a": 1, "a": 2}')]).calls
    assert (v.verdict, v.on_invalid) == ("invalid", "deny")


def test_too_deep_or_too_long_arguments(support: Effective) -> None:
    deep = run(support, [call("lookup", raw='{"a":' * 5 + "1" + "}" * 5)], context=ctx(max_depth=3))
    assert deep.calls[0].verdict == "invalid"
    long = run(support, [call("lookup", {"a": "x" * 20})], context=ctx(max_string=10))
    assert long.calls[0].verdict == "invalid"


@pytest.mark.parametrize("raw", ["[1, 2]", '"text"', "3", "null"])
def test_non_object_arguments_are_invalid(support: Effective, raw: str) -> None:
    d = run(support, [call("apply_credit", raw=raw)])
    (v,) = d.calls
    assert (v.verdict, v.rule_id, v.on_invalid) == ("invalid", "apply_credit:arguments", "deny")
    assert v.errors == ("arguments must be a JSON object",)
    assert d.errors == ("apply_credit: arguments must be a JSON object",)


def test_empty_arguments_are_an_empty_object(support: Effective) -> None:
    (v,) = run(support, [call("lookup", raw="")]).calls
    assert (v.verdict, v.args) == ("allow", {})


def test_pinned_schema_beats_declared(support: Effective) -> None:
    declared = {"apply_credit": compile_schema({"type": "object"})}
    d = run(support, [call("apply_credit", {"amount": 1})], context=ctx(declared_schemas=declared))
    (v,) = d.calls
    assert (v.verdict, v.rule_id, v.on_invalid, v.max_repairs) == ("invalid", "apply_credit:schema", "repair", 2)
    assert v.args == {"amount": 1} and v.args_hash is not None
    assert any("customer_id" in e for e in v.errors)
    assert d.errors == tuple(f"apply_credit: {e}" for e in v.errors)


def test_declared_schema_used_when_no_pinned(support: Effective) -> None:
    declared = {"lookup": compile_schema({"type": "object", "required": ["id"]})}
    (v,) = run(support, [call("lookup", {})], context=ctx(declared_schemas=declared)).calls
    assert (v.verdict, v.rule_id, v.on_invalid, v.max_repairs) == ("invalid", "lookup:schema", "repair", 1)
    assert v.errors[0].startswith("/: ")
    (v,) = run(support, [call("lookup", {"id": 1})], context=ctx(declared_schemas=declared)).calls
    assert v.verdict == "allow"


def test_pinned_schemas_from_several_policies_all_apply() -> None:
    a = policy("a", "tools:\n  allow:\n    t:\n      on_invalid: deny\n      schema: {required: [x]}\n",
               match="{all: true}")
    b = policy("b", "tools:\n  allow:\n    t:\n      schema: {required: [y]}\n")
    eff = eff_of(a, b)
    (v,) = run(eff, [call("t", {"x": 1})]).calls
    assert v.verdict == "invalid" and v.on_invalid == "deny" and len(v.errors) == 1
    assert run(eff, [call("t", {"x": 1, "y": 2})]).calls[0].verdict == "allow"


# --- rules ----------------------------------------------------------------------------


def test_small_credit_is_allowed_with_once_flag(support: Effective) -> None:
    d = run(support, [credit(10)])
    (v,) = d.calls
    assert (v.verdict, v.once, v.rule_id) == ("allow", True, None)
    assert d.rule_ids == ("allow-small",) and d.effect == "allow"


def test_escalation_rewrites_the_call(support: Effective) -> None:
    d = run(support, [credit(60)])
    (v,) = d.calls
    assert (v.verdict, v.rule_id, v.reason, v.new_name) == ("escalate", "escalate-50", "over 50", "escalate_to_human")
    assert v.new_arguments is not None
    assert orjson.loads(v.new_arguments) == {
        "reason": "over 50", "original_tool": "apply_credit",
        "original_arguments": {"customer_id": "c1", "amount": 60},
    }
    assert d.actions == ("escalated:apply_credit",) and d.reasons == ("over 50",) and d.effect == "modify"


def test_require_approval_holds(support: Effective) -> None:
    d = run(support, [credit(500)])
    (v,) = d.calls
    assert (v.verdict, v.rule_id, v.once) == ("hold", "approve-mid", True)
    assert v.reason == "rule approve-mid matched"
    assert d.rule_ids == ("escalate-50", "approve-mid") and d.actions == ("held:apply_credit",)
    assert d.effect == "deny"  # every call was removed from the response


def test_deny_beats_everything(support: Effective) -> None:
    d = run(support, [credit(5000)])
    (v,) = d.calls
    assert (v.verdict, v.rule_id, v.reason) == ("deny", "deny-huge", "too much")
    assert d.rule_ids == ("approve-mid", "escalate-50", "deny-huge")
    assert d.actions == ("tool_denied:apply_credit",)


def test_precedence_does_not_depend_on_rule_order() -> None:
    pol = policy("p", """tools:
  escalate_to: human
  allow:
    t:
      rules:
        - {id: a-allow, when: "true", action: allow}
        - {id: b-escalate, when: "true", action: escalate}
        - {id: c-approve, when: "true", action: require_approval}
        - {id: d-deny, when: "true", action: deny}
        - {id: e-escalate, when: "true", action: escalate}
""")
    d = run(eff_of(pol), [call("t")])
    assert d.calls[0].verdict == "deny" and d.calls[0].rule_id == "d-deny"
    assert set(d.rule_ids) == {"a-allow", "b-escalate", "c-approve", "d-deny", "e-escalate"}
    assert d.reasons == ("rule d-deny matched",)


def test_shadow_rule_reports_would_only(support: Effective) -> None:
    d = run(support, [credit(10, cid="vip")])
    assert d.calls[0].verdict == "allow"
    assert d.would == ("would_deny:apply_credit",) and "watch" in d.rule_ids


def test_shadow_policy_rules_do_not_enforce() -> None:
    sh = policy("sh", "tools:\n  escalate_to: h\n  allow:\n    t:\n      rules:\n"
                      "        - {id: r, when: 'true', action: escalate}\n", mode="shadow")
    d = run(eff_of(sh), [call("t")])
    assert d.calls[0].verdict == "allow" and d.would == ("would_escalate:t",) and d.effect == "allow"


def test_escalation_goes_to_the_most_specific_policys_tool() -> None:
    team = policy("team", "tools:\n  escalate_to: team_queue\n", match="{teams: [t1]}")
    key = policy("key", "tools:\n  escalate_to: key_queue\n  allow:\n    t:\n      rules:\n"
                        "        - {id: r, when: 'true', action: escalate}\n")
    (v,) = run(eff_of(team, key), [call("t")]).calls
    assert (v.verdict, v.new_name) == ("escalate", "key_queue")


def test_escalate_without_allowed_escalation_tool_denies() -> None:
    org = policy("org", "tools:\n  deny: ['human']\n", match="{all: true}")
    key = policy("key", "tools:\n  escalate_to: human\n  allow:\n    t:\n      rules:\n"
                        "        - {id: r, when: 'true', action: escalate, reason: check}\n")
    d = run(eff_of(org, key), [call("t")])
    (v,) = d.calls
    assert (v.verdict, v.rule_id, v.reason) == ("deny", "r", "check")
    assert d.reasons == ("check (no escalation tool allowed)",) and d.actions == ("tool_denied:t",)


ERRORING = """tools:
  escalate_to: human
  allow:
    t:
      rules:
        - {{id: r, when: "args.missing > 1", action: {action}, on_error: {on_error}}}
"""


@pytest.mark.parametrize(
    ("action", "on_error", "verdict"),
    [
        ("deny", "match", "deny"), ("deny", "skip", "allow"),
        ("require_approval", "match", "hold"), ("require_approval", "skip", "allow"),
        ("escalate", "match", "escalate"), ("escalate", "skip", "allow"),
        ("allow", "match", "allow"), ("allow", "skip", "allow"),
    ],
)
def test_runtime_error_on_error_semantics(action: str, on_error: str, verdict: str) -> None:
    d = run(eff_of(policy("p", ERRORING.format(action=action, on_error=on_error))), [call("t", {})])
    assert d.calls[0].verdict == verdict
    assert len(d.errors) == 1 and d.errors[0].startswith("r: ") and "missing" in d.errors[0]


def test_non_bool_result_is_a_runtime_error() -> None:
    pol = policy("p", "tools:\n  allow:\n    t:\n      rules:\n        - {id: r, when: 'args.flag', action: deny}\n")
    d = run(eff_of(pol), [call("t", {"flag": "yes"})])
    assert d.calls[0].verdict == "deny" and d.errors == ("r: condition returned STRING, not bool",)


def test_rules_see_tool_model_and_principal() -> None:
    pol = policy("p", "tools:\n  allow:\n    t:\n      rules:\n        - {id: r, when: \"tool == 't' && "
                      "model == 'gpt-4o' && principal.key == 'k1' && principal.team == 't1'\", action: deny}\n")
    assert run(eff_of(pol), [call("t")]).calls[0].verdict == "deny"


ESCALATE_INVALID = """tools:
  default: deny
  escalate_to: escalate_to_human
  allow:
    escalate_to_human: {}
    apply_credit:
      on_invalid: escalate
      schema:
        type: object
        required: [customer_id, amount]
        properties:
          customer_id: {type: string}
          amount: {type: number}
"""


def test_on_invalid_escalate_rewrites_the_call_through_every_layer() -> None:
    d = run(eff_of(ORG, policy("support", ESCALATE_INVALID)), [call("apply_credit", raw='{"amount": "x"}')])
    v = d.calls[0]
    assert (v.verdict, v.rule_id, v.new_name) == ("escalate", "apply_credit:schema", "escalate_to_human")
    assert v.reason.startswith("invalid arguments: ")
    assert v.new_arguments is not None and orjson.loads(v.new_arguments)["original_arguments"] == '{"amount": "x"}'
    assert v.then is not None and (v.then.verdict, v.then.call.name) == ("allow", "escalate_to_human")
    assert "escalated:apply_credit" in d.actions
    blocked = eff_of(policy("org", "tools:\n  deny: ['escalate_*']\n", match="{all: true}"),
                     policy("support", ESCALATE_INVALID))
    assert run(blocked, [call("apply_credit", raw='{"amount": "x"}')]).calls[0].verdict == "deny"


def test_an_escalation_call_goes_through_every_layer() -> None:
    """A team's escalate_to naming a tool the org holds for approval: the escalation call is held."""
    org = policy("org", """tools:
  allow:
    close_account:
      rules:
        - {id: org-hold-close, when: "true", action: require_approval, reason: closing needs a human}
""", match="{all: true}")
    team = policy("team", """tools:
  escalate_to: close_account
  allow:
    close_account: {}
    refund:
      rules:
        - {id: always-escalate, when: "true", action: escalate}
""")
    v = run(eff_of(org, team), [call("refund", {"amount": 5})]).calls[0]
    assert v.verdict == "escalate" and v.then is not None
    assert (v.then.verdict, v.then.rule_id, v.then.call.name) == ("hold", "org-hold-close", "close_account")
    # a broader policy that denies the escalation call outright: the original call is denied instead
    deny = policy("org", """tools:
  allow:
    close_account:
      rules:
        - {id: org-no-close, when: "true", action: deny}
""", match="{all: true}")
    d = run(eff_of(deny, team), [call("refund", {"amount": 5})])
    assert d.calls[0].verdict == "deny" and any("escalation call close_account refused" in e for e in d.errors)


# --- output ------------------------------------------------------------------------------

OUTPUT = policy("out", """output:
  max_repairs: 3
  on_invalid: deny
  schema:
    type: object
    required: [action, confidence]
    properties:
      action: {enum: [resolve, escalate]}
      confidence: {type: number}
      requires_human_review: {type: boolean}
  rules:
    - {id: low-confidence, when: "output.confidence < 0.75", action: rewrite, set: {requires_human_review: true},
       reason: review}
    - {id: very-low, when: "output.confidence < 0.5", action: rewrite, set: {action: escalate}}
    - {id: no-escalate-in-test, when: "output.action == 'escalate' && output.confidence == 0.0", action: deny,
       reason: nope}
    - {id: shadow-resolve, when: "output.action == 'resolve'", action: deny, mode: shadow}
  deny_patterns:
    - {id: ssn, regex: '\\d{3}-\\d{2}-\\d{4}', reason: no SSNs}
    - {id: card, regex: '\\b4\\d{15}\\b', mode: shadow}
""")


@pytest.fixture(scope="module")
def out() -> Effective:
    return eff_of(OUTPUT)


def js(value: Any) -> str:
    return orjson.dumps(value).decode()


def test_output_allowed(out: Effective) -> None:
    d = run(out, content=js({"action": "escalate", "confidence": 0.9}))
    assert d.output is not None and d.output.verdict == "allow" and d.effect == "allow"


def test_output_deny_pattern_enforced(out: Effective) -> None:
    d = run(out, content="your ssn is 123-45-6789")
    assert d.output is not None
    assert (d.output.verdict, d.output.rule_id, d.output.reason) == ("deny", "ssn", "no SSNs")
    assert d.effect == "deny" and d.actions == ("output_denied",)


def test_output_deny_pattern_shadow(out: Effective) -> None:
    d = run(out, content=js({"action": "escalate", "confidence": 0.9, "note": "4111111111111111"}))
    assert d.output is not None and d.output.verdict == "allow" and d.effect == "allow"
    assert d.would == ("would_output_denied",) and d.rule_ids == ("card",) and d.actions == ()


def test_output_pattern_default_reason() -> None:
    pol = policy("p", "output:\n  deny_patterns:\n    - {id: secret, regex: 'sk-[a-z]+'}\n")
    d = run(eff_of(pol), content="key sk-abc")
    assert d.output is not None and d.output.reason == "output matches pattern secret"
    fine = run(eff_of(pol), content="fine").output
    assert fine is not None and fine.verdict == "allow"


def test_output_schema_invalid(out: Effective) -> None:
    d = run(out, content=js({"action": "explode", "confidence": 0.9}))
    assert d.output is not None
    o = d.output
    assert (o.verdict, o.rule_id, o.on_invalid, o.max_repairs) == ("invalid", "output:schema", "deny", 3)
    assert o.reason == "output does not match the schema" and o.errors and d.errors == o.errors
    assert d.effect == "modify"


def test_output_not_json_with_schema_is_invalid(out: Effective) -> None:
    d = run(out, content="I think we should resolve it")
    assert d.output is not None
    assert (d.output.verdict, d.output.reason) == ("invalid", "output is not valid JSON")
    assert d.errors[0].startswith("content: ")


def test_output_not_json_without_schema_is_free_text() -> None:
    pol = policy("p", "output:\n  rules:\n    - {id: r, when: 'output.x == 1', action: deny}\n")
    d = run(eff_of(pol), content="plain words")
    assert d.output is not None and d.output.verdict == "allow"


def test_response_schema_from_request_applies_without_policy() -> None:
    schema = compile_schema({"type": "object", "required": ["a"]})
    eff = eff_of(policy("plain"))
    d = run(eff, content=js({"b": 1}), context=ctx(response_schema=schema))
    assert d.output is not None
    assert (d.output.verdict, d.output.on_invalid, d.output.max_repairs) == ("invalid", "repair", 1)
    assert run(eff, content=js({"a": 1}), context=ctx(response_schema=schema)).output is not None
    assert run(eff, content=js({"b": 1})).output is None  # nothing to inspect without a schema


def test_output_rewrite(out: Effective) -> None:
    d = run(out, content=js({"action": "resolve", "confidence": 0.6}))
    o = d.output
    assert o is not None and (o.verdict, o.rule_id, o.reason) == ("rewrite", "low-confidence", "review")
    assert o.content is not None
    assert orjson.loads(o.content) == {"action": "resolve", "confidence": 0.6, "requires_human_review": True}
    assert d.actions == ("output_rewritten:low-confidence",) and d.reasons == ("review",)
    assert d.would == ("would_output_deny",) and d.effect == "modify"


def test_several_rewrites_merge(out: Effective) -> None:
    d = run(out, content=js({"action": "resolve", "confidence": 0.1}))
    o = d.output
    assert o is not None and o.verdict == "rewrite" and o.rule_id == "very-low" and o.reason == ""
    assert o.content is not None
    assert orjson.loads(o.content) == {"action": "escalate", "confidence": 0.1, "requires_human_review": True}


def test_output_deny_rule(out: Effective) -> None:
    d = run(out, content=js({"action": "escalate", "confidence": 0.0}))
    o = d.output
    assert o is not None and (o.verdict, o.rule_id, o.reason) == ("deny", "no-escalate-in-test", "nope")
    assert d.effect == "deny" and "output_denied" in d.actions


def test_output_deny_rule_default_reason() -> None:
    pol = policy("p", "output:\n  rules:\n    - {id: r, when: 'output.x == 1', action: deny}\n")
    d = run(eff_of(pol), content=js({"x": 1}))
    assert d.output is not None and d.output.reason == "rule r matched" and d.reasons == ("rule r matched",)


def test_output_rule_runtime_errors() -> None:
    rules = ("output:\n  rules:\n    - {id: d, when: 'output.missing > 1', action: deny, on_error: %s}\n"
             "    - {id: w, when: 'output.missing > 1', action: rewrite, set: {a: 1}}\n")
    d = run(eff_of(policy("p", rules % "match")), content=js({"x": 1}))
    assert d.output is not None and d.output.verdict == "deny" and d.errors[0].startswith("d: ")
    d = run(eff_of(policy("p", rules % "skip")), content=js({"x": 1}))
    assert d.output is not None and d.output.verdict == "allow"  # an erroring rewrite never applies
    assert len(d.errors) == 2


def test_output_that_is_not_an_object_skips_rules() -> None:
    pol = policy("p", "output:\n  schema: {type: array}\n  rules:\n    - {id: r, when: 'true', action: deny}\n")
    d = run(eff_of(pol), content="[1, 2]")
    assert d.output is not None and d.output.verdict == "allow"


def test_empty_or_missing_content_is_not_inspected(out: Effective) -> None:
    assert run(out, content="").output is None
    assert run(out, content=None).output is None


def test_shadow_output_policy() -> None:
    sh = policy("sh", "output:\n  rules:\n    - {id: r, when: 'true', action: rewrite, set: {a: 1}}\n", mode="shadow")
    d = run(eff_of(sh), content=js({"x": 1}))
    assert d.output is not None and d.output.verdict == "allow" and d.would == ("would_output_rewrite",)


# --- effect ---------------------------------------------------------------------------------


def test_effect_computation(support: Effective) -> None:
    assert run(support).effect == "allow"
    assert run(support, [call("lookup"), call("nope", index=1)]).effect == "modify"
    assert run(support, [call("nope"), call("Nope", index=1)]).effect == "deny"
    assert run(support, [credit(60)]).effect == "modify"
    assert run(support, [credit(500), credit(10)]).effect == "modify"
    assert run(support, [credit(500), call("lookup", raw="[]")]).effect == "deny"


def test_same_rule_id_in_two_policies_is_recorded_once() -> None:
    rule = "tools:\n  allow:\n    t:\n      rules:\n        - {id: same, when: 'true', action: allow}\n"
    d = run(eff_of(policy("a", rule, match="{all: true}"), policy("b", rule)), [call("t")])
    assert d.rule_ids == ("same",) and d.calls[0].verdict == "allow"


# --- shadow schemas ----------------------------------------------------------------------------

SHADOW_SCHEMAS = policy("sh", """tools:
  allow:
    t:
      schema: {type: object, required: [id]}
output:
  schema: {type: object, required: [answer]}
""", mode="shadow")


def test_shadow_tool_schema_reports_and_allows() -> None:
    eff = eff_of(SHADOW_SCHEMAS)
    d = run(eff, [call("t", {})])
    assert d.calls[0].verdict == "allow" and d.effect == "allow"
    assert d.would == ("would_schema_invalid:t",) and d.rule_ids == ("sh:schema",)
    assert run(eff, [call("t", {"id": 1})]).would == ()


def test_shadow_tool_schema_does_not_set_on_invalid() -> None:
    (v,) = run(eff_of(SHADOW_SCHEMAS), [call("t", raw="{bad")]).calls
    assert (v.verdict, v.on_invalid) == ("invalid", "deny")


def test_shadow_output_schema_reports_and_allows() -> None:
    eff = eff_of(SHADOW_SCHEMAS)
    d = run(eff, content=js({"other": 1}))
    assert d.output is not None and d.output.verdict == "allow"
    assert d.would == ("would_schema_invalid:output",)
    d = run(eff, content="not json")
    assert d.output is not None and d.output.verdict == "allow"
    assert d.would == ("would_schema_invalid:output",)
    assert run(eff, content=js({"answer": 1})).would == ()


def test_shadow_and_enforced_output_schema_together() -> None:
    enforced = policy("en", "output:\n  schema: {type: object, required: [action]}\n", match="{all: true}")
    eff = eff_of(enforced, SHADOW_SCHEMAS)
    d = run(eff, content=js({"action": 1}))
    assert d.output is not None and d.output.verdict == "allow" and d.would == ("would_schema_invalid:output",)
    d = run(eff, content=js({"answer": 1}))
    assert d.output is not None and d.output.verdict == "invalid" and d.would == ()
    d = run(eff, content="text")
    assert d.output is not None and d.output.verdict == "invalid" and d.would == ("would_schema_invalid:output",)


def test_deny_patterns_also_apply_to_other_text_fields() -> None:
    """A refusal or reasoning field cannot carry what a deny pattern forbids in content."""
    from rules.evaluate import Principal
    from rules.evaluate_response import ResponseContext, evaluate_response

    text = """apiVersion: guardproxy/v1
kind: Policy
metadata: {name: p}
match: {all: true}
output:
  deny_patterns:
    - {id: no-ssn, regex: '\\d{3}-\\d{2}-\\d{4}', reason: no SSNs}
"""
    loaded = load_policies([("p.yaml", text)])
    compiled, errors = compile_policies(loaded.policies)
    assert compiled is not None and not errors
    eff = compiled.for_principal("k", None)
    ctx = ResponseContext(Principal("k"), "m")
    d = evaluate_response(eff, [], None, ctx, now=0.0, other_text=["my ssn is 123-45-6789"])
    assert d.output is not None and d.output.verdict == "deny" and d.output.rule_id == "no-ssn"
    assert d.effect == "deny"
    clean = evaluate_response(eff, [], "fine", ctx, now=0.0, other_text=["nothing here"])
    assert clean.output is not None and clean.output.verdict == "allow"


# --- layering of output rewrites and deny patterns on every text ----------------------------------

ORG_OUT = policy("org", """output:
  schema:
    type: object
    properties:
      action: {enum: [resolve, escalate]}
      requires_human_review: {type: boolean}
  deny_patterns:
    - {id: no-cards, regex: '\\b(?:\\d[ -]?){13,16}\\b', reason: no card numbers}
  rules:
    - id: org-review
      when: "has(output.confidence) && output.confidence < 0.75"
      action: rewrite
      set: {requires_human_review: true}
""", match="{all: true}")
TEAM_OUT = policy("team", """output:
  rules:
    - {id: team-no-review, when: "true", action: rewrite, set: {requires_human_review: false}}
""", match="{teams: [t1]}")


def test_a_team_rewrite_cannot_override_a_field_the_org_rewrite_set() -> None:
    eff = eff_of(ORG_OUT, TEAM_OUT)
    low = run(eff, content='{"action": "resolve", "confidence": 0.5}').output
    assert low is not None and low.verdict == "rewrite" and low.content is not None
    assert orjson.loads(low.content)["requires_human_review"] is True  # the org's value stands
    high = run(eff, content='{"action": "resolve", "confidence": 0.9}').output
    assert high is not None and high.content is not None
    assert orjson.loads(high.content)["requires_human_review"] is False  # the org set nothing: the team may


@pytest.mark.parametrize(("team_set", "verdict", "rule"), [
    ("{action: refund_everything}", "invalid", "team-bad"),   # breaks the org's enum
    ("{note: '4111 1111 1111 1111'}", "deny", "no-cards"),   # a card number the org forbids
])
def test_the_rewritten_output_is_checked_again(team_set: str, verdict: str, rule: str) -> None:
    team = policy("team", f"""output:
  rules:
    - {{id: team-bad, when: "true", action: rewrite, set: {team_set}}}
""", match="{teams: [t1]}")
    out = run(eff_of(ORG_OUT, team), content='{"action": "resolve"}').output
    assert out is not None and (out.verdict, out.rule_id) == (verdict, rule)


@pytest.mark.parametrize("raw", [
    '{"note": "card 4111 1111 1111 1111"}',
    '{"note": "card \\u0034111111111111111"}',  # an escape does not hide it
])
def test_deny_patterns_apply_to_tool_call_arguments(raw: str) -> None:
    d = run(eff_of(ORG_OUT), [call("send_email", raw=raw), call("lookup", {"q": "ok"}, index=1)])
    assert [(v.call.name, v.verdict, v.rule_id) for v in d.calls] == [
        ("send_email", "deny", "no-cards"), ("lookup", "allow", None)]
    assert "tool_denied:send_email" in d.actions


def test_deny_patterns_apply_to_every_other_text() -> None:
    d = run(eff_of(ORG_OUT), content=None)
    assert d.output is None
    d = evaluate_response(eff_of(ORG_OUT), [], None, ctx(), now=0.0, other_text=["transcript 4111111111111111"])
    assert d.output is not None and (d.output.verdict, d.output.rule_id) == ("deny", "no-cards")
