"""rules.compiler and rules.layering: compile-time errors with lines, revisions, loosening warnings."""

from __future__ import annotations

import re

import pytest
from policy_builders import compile_docs, policy
from policy_builders import compiled as ok

from rules.compiler import glob_to_re2


def bad(*docs: str) -> list[tuple[int | None, str, str]]:
    cps, errors = compile_docs(*docs)
    assert cps is None
    return [(e.line, e.path, e.message) for e in errors]


TOOL_RULE = """tools:
  escalate_to: human
  allow:
    human: {{}}
    refund:
      schema: {{type: object}}
      rules:
        - id: r1
          when: "{when}"
          action: {action}
"""


def test_compiles_rules_schemas_patterns() -> None:
    cps = ok(policy("p", TOOL_RULE.format(when="double(args.amount) > 5.0", action="escalate") + """output:
  schema: {type: object}
  rules:
    - {id: o1, when: "has(output.x)", action: deny}
  deny_patterns:
    - {id: ssn, regex: '\\d{3}-\\d{2}-\\d{4}'}
"""))
    (cp,) = cps.policies
    assert cp.name == "p" and cp.source == "0.yaml"
    assert [r.id for r in cp.tool_rules["refund"]] == ["r1"]
    assert cp.tool_schemas["refund"].schema.is_valid({}) and set(cp.tool_schemas) == {"refund"}
    assert cp.output_schema is not None and cp.output_rules[0].id == "o1"
    assert cp.deny_patterns[0].regex.search("123-45-6789")
    assert re.fullmatch("[0-9a-f]{12}", cps.revision)
    assert cps.warnings == ()


def test_bad_cel_has_line_and_column() -> None:
    ((line, path, msg),) = bad(policy("p", TOOL_RULE.format(when="args.amount >", action="deny")))
    assert (line, path) == (14, "tools.allow.refund.rules[0].when")
    assert msg.startswith("invalid CEL (column 14): Syntax error")


def test_non_bool_cel_is_an_error_without_column() -> None:
    ((line, path, msg),) = bad(policy("p", TOOL_RULE.format(when="args.amount + 1", action="deny")))
    assert (line, path, msg) == (14, "tools.allow.refund.rules[0].when",
                                 "invalid CEL: condition must be boolean, it returns INT")


def test_bad_output_rule_cel() -> None:
    ((line, path, msg),) = bad(policy("p", "output:\n  rules:\n    - {id: o, when: 'output.', action: deny}\n"))
    assert (line, path) == (8, "output.rules[0].when") and msg.startswith("invalid CEL")


def test_invalid_tool_schema_and_output_schema() -> None:
    got = bad(policy("p", "tools:\n  allow:\n    t:\n      schema: {type: nope}\noutput:\n  schema: {minimum: x}\n"))
    assert [(line, path) for line, path, _ in got] == [(9, "tools.allow.t.schema"), (11, "output.schema")]
    assert all(msg.startswith("invalid JSON schema") for _, _, msg in got)


def test_bad_regex() -> None:
    ((line, path, msg),) = bad(policy("p", "output:\n  deny_patterns:\n    - {id: x, regex: 'a(b'}\n"))
    assert (line, path) == (8, "output.deny_patterns[0].regex") and msg.startswith("invalid RE2 regex")


def test_re2_only_syntax_is_refused() -> None:
    # Backreferences are not RE2: they would make matching super-linear.
    ((_, path, _),) = bad(policy("p", "output:\n  deny_patterns:\n    - {id: x, regex: '(a)\\1'}\n"))
    assert path == "output.deny_patterns[0].regex"


def test_escalate_to_not_in_default_deny_allowlist() -> None:
    got = bad(policy("p", "tools:\n  default: deny\n  escalate_to: human\n  allow:\n    refund: {}\n"))
    assert got == [(8, "tools.escalate_to", "escalation tool 'human' is not allowed by tools.allow/deny")]


def test_escalate_to_matched_by_own_deny_glob() -> None:
    got = bad(policy("p", "tools:\n  escalate_to: escalate_human\n  deny: ['escalate_*']\n"))
    assert [(line, path) for line, path, _ in got] == [(7, "tools.escalate_to")]


def test_escalate_to_invalid_name() -> None:
    got = bad(policy("p", "tools:\n  escalate_to: 'not valid'\n"))
    assert [(line, path) for line, path, _ in got] == [(7, "tools.escalate_to")]


def test_escalate_to_allowed_by_default_allow() -> None:
    ok(policy("p", "tools:\n  escalate_to: human\n"))


def test_escalate_action_and_on_invalid_escalate_need_escalate_to() -> None:
    got = bad(policy("p", """tools:
  allow:
    refund:
      on_invalid: escalate
      rules:
        - {id: r, when: 'true', action: escalate}
"""))
    assert [(line, path, msg) for line, path, msg in got] == [
        (11, "tools.allow.refund.rules[0].action", "action escalate needs tools.escalate_to"),
        (9, "tools.allow.refund.on_invalid", "on_invalid escalate needs tools.escalate_to"),
    ]


def test_invalid_tool_names_in_allow() -> None:
    got = bad(policy("p", "tools:\n  allow:\n    'has space': {}\n    'apply.credit': {}\n    ok_name: {}\n"))
    assert [(line, path) for line, path, _ in got] == [(8, "tools.allow.has space"), (9, "tools.allow.apply.credit")]
    assert all("^[A-Za-z0-9_-]{1,64}$" in msg for _, _, msg in got)


def test_empty_deny_glob() -> None:
    assert bad(policy("p", "tools:\n  deny: ['']\n")) == [(7, "tools.deny[0]", "empty pattern")]


LADDER = """models:
  allow: [big, small]
cost:
  ladder:
    - {{at: 0.5, downgrade: {{big: {target}}}}}
"""


def test_ladder_downgrade_target_must_be_allowed() -> None:
    got = bad(policy("p", LADDER.format(target="other")))
    assert got == [(10, "cost.ladder[0].downgrade.big", "downgrade target 'other' is not in models.allow")]
    ok(policy("p", LADDER.format(target="small")))


def test_ladder_without_model_allowlist_or_downgrade() -> None:
    ok(policy("p", "cost:\n  ladder:\n    - {at: 0.5, downgrade: {big: anything}}\n    - {at: 0.9, "
                   "compress_to_tokens: 100}\n"))


def test_errors_in_several_policies_are_all_reported() -> None:
    cps, errors = compile_docs(policy("a", "tools:\n  deny: ['']\n"), policy("b", "tools:\n  deny: ['']\n"),
                               policy("c"))
    assert cps is None
    assert [e.source for e in errors] == ["0.yaml", "1.yaml"]


def test_glob_to_re2() -> None:
    assert glob_to_re2("delete_*") == "^delete_.*$"
    assert glob_to_re2("a?c") == "^a.c$"
    assert glob_to_re2("a.b") == "^a\\.b$"


def test_deny_globs_are_anchored() -> None:
    cps = ok(policy("p", "tools:\n  deny: ['delete_*', '*_admin', 'x?']\n"))
    gate = cps.policies[0].gate
    assert gate.blocks("delete_user") and gate.blocks("db_admin") and gate.blocks("xy")
    assert not gate.blocks("undelete_user") and not gate.blocks("db_admins") and not gate.blocks("xyz")


def test_revision_is_a_content_hash_independent_of_order() -> None:
    a, b = policy("a"), policy("b")
    r1 = ok(a, b).revision
    assert ok(b, a).revision == r1
    assert ok(a, policy("b", "tools:\n  deny: [x]\n")).revision != r1


def test_policies_are_ordered_org_team_key() -> None:
    cps = ok(policy("k", match="{keys: [k1]}"), policy("t", match="{teams: [t1]}"), policy("o"))
    assert [cp.name for cp in cps.policies] == ["o", "t", "k"]


def test_for_principal_matches_and_memoizes() -> None:
    cps = ok(policy("k", match="{keys: [k1]}"), policy("t", match="{teams: [t1]}"), policy("o"))
    assert cps.for_principal("k1", "t1").policy_names == ("o", "t", "k")
    assert cps.for_principal("k1", None).policy_names == ("o", "k")
    assert cps.for_principal("k2", "t1").policy_names == ("o", "t")
    assert cps.for_principal("k2", "t2").policy_names == ("o",)
    assert cps.for_principal("k1", "t1") is cps.for_principal("k1", "t1")
    assert all(eff.revision == cps.revision for eff in cps._effective.values())


def test_for_principal_cache_is_bounded() -> None:
    cps = ok(policy("o"))
    filler = cps.for_principal("seed", None)
    cps._effective.update({(str(i), None): filler for i in range(100_000)})
    first = cps.for_principal("new", None)
    assert ("new", None) not in cps._effective
    assert first.policy_names == ("o",) and first is not cps.for_principal("new", None)


# --- layering warnings -------------------------------------------------------


def warnings_of(*docs: str) -> list[tuple[str, int | None, str, str]]:
    cps = ok(*docs)
    assert all(w.severity == "warning" for w in cps.warnings)
    return [(w.source, w.line, w.path, w.message) for w in cps.warnings]


ORG = policy("org", """models:
  allow: [a, b]
  params:
    temperature: {min: 0.1, max: 1.0}
    top_p: {max: 0.9}
tools:
  deny: ['delete_*']
cost:
  per_request_usd: 0.10
  per_conversation_usd: 1
""")


def test_loosening_a_broader_policy_is_warned() -> None:
    key = policy("key", """models:
  allow: [a, c]
  params:
    temperature: {min: 0.0, max: 2.0}
    seed: {max: 5}
tools:
  allow:
    delete_user: {}
    lookup: {}
cost:
  per_request_usd: 0.50
  per_conversation_usd: 0.5
""", match="{keys: [k]}")
    got = warnings_of(ORG, key)
    assert [(src, line, path) for src, line, path, _ in got] == [
        ("1.yaml", 7, "models.allow"),
        ("1.yaml", 9, "models.params.temperature"),
        ("1.yaml", 9, "models.params.temperature"),
        ("1.yaml", 13, "tools.allow.delete_user"),
        ("1.yaml", 16, "cost.per_request_usd"),
    ]
    msgs = [m for *_, m in got]
    assert msgs[0] == "model 'c' is not allowed by org; it stays refused"
    assert msgs[1] == "temperature max is looser than org's 1.0; the lower limit applies"
    assert msgs[2] == "temperature min is looser than org's 0.1; the higher limit applies"
    assert msgs[3] == "tool 'delete_user' is denied by org; it stays denied"
    assert msgs[4] == "per_request_usd is looser than org's; the lower applies"
    # Warnings do not stop the set from compiling, and the stricter limits still apply.
    assert str(ok(ORG, key).warnings[0]).startswith("1.yaml:7: [models.allow] warning: ")


def test_unset_limits_in_narrow_policy_are_looser() -> None:
    team = policy("team", "models:\n  params:\n    temperature: {max: 0.5}\n", match="{teams: [t]}")
    got = warnings_of(ORG, team)
    assert [m for *_, m in got] == ["temperature min is looser than org's 0.1; the higher limit applies"]
    team2 = policy("team", "models:\n  params:\n    temperature: {min: 0.5}\n", match="{teams: [t]}")
    assert [m for *_, m in warnings_of(ORG, team2)] == [
        "temperature max is looser than org's 1.0; the lower limit applies"
    ]


def test_tighter_narrow_policy_has_no_warnings() -> None:
    key = policy("key", """models:
  allow: [a]
  params:
    temperature: {min: 0.2, max: 0.5}
tools:
  allow:
    lookup: {}
cost:
  per_request_usd: 0.05
""", match="{keys: [k]}")
    assert warnings_of(ORG, key) == []


def test_team_over_key_and_same_level_pairs() -> None:
    team = policy("team", "tools:\n  default: deny\n  allow:\n    lookup: {}\n", match="{teams: [t]}")
    key = policy("key", "tools:\n  allow:\n    other: {}\n", match="{keys: [k]}")
    key2 = policy("key2", "tools:\n  allow:\n    third: {}\n", match="{keys: [k2]}")
    got = warnings_of(team, key, key2)
    assert [(path, m) for _, _, path, m in got] == [
        ("tools.allow.other", "tool 'other' is denied by team; it stays denied"),
        ("tools.allow.third", "tool 'third' is denied by team; it stays denied"),
    ]


def test_broad_without_model_allowlist_or_cost() -> None:
    org = policy("org", "models:\n  params:\n    temperature: {max: 1}\n")
    key = policy("key", "models:\n  allow: [x]\n  params:\n    top_p: {max: 1}\ncost: {per_request_usd: 1}\n",
                 match="{keys: [k]}")
    assert warnings_of(org, key) == []
    key_nocost = policy("key", "cost: {per_conversation_usd: 2}\n", match="{keys: [k]}")
    assert warnings_of(ORG.replace("  per_request_usd: 0.10\n", ""), key_nocost) == [
        ("1.yaml", 6, "cost.per_conversation_usd", "per_conversation_usd is looser than org's; the lower applies")
    ]


@pytest.mark.parametrize("narrow_cost", ["", "cost: {budgets: [{scope: key, window: day, usd: 1}]}\n"])
def test_cost_fields_missing_on_one_side(narrow_cost: str) -> None:
    key = policy("key", narrow_cost, match="{keys: [k]}")
    assert warnings_of(ORG, key) == []
