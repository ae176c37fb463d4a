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
    cps._effective.update({(str(i), None, "default"): filler for i in range(100_000)})
    first = cps.for_principal("new", None)
    assert ("new", None, "default") not in cps._effective
    assert first.policy_names == ("o",) and first is not cps.for_principal("new", None)


def test_match_teams_is_scoped_by_org() -> None:
    cps = ok(policy("plain", match="{teams: [support]}"), policy("acme", match="{teams: [acme/support]}"),
             policy("explicit", match="{teams: [default/sales]}"), policy("slashy", match="{teams: ['x/y/z']}"))
    assert cps.for_principal("k", "support").policy_names == ("plain",)
    assert cps.for_principal("k", "support", "default").policy_names == ("plain",)
    assert cps.for_principal("k", "support", "acme").policy_names == ("acme",)
    assert cps.for_principal("k", "sales").policy_names == ("explicit",)
    assert cps.for_principal("k", "sales", "acme").policy_names == ()
    assert cps.for_principal("k", "y/z", "x").policy_names == ("slashy",)  # split on the first /
    # The memo tells the orgs apart too.
    assert cps.for_principal("k", "support") is not cps.for_principal("k", "support", "acme")
    assert cps.for_principal("k", "support", "acme") is cps.for_principal("k", "support", "acme")
    plain = cps.policies[[cp.name for cp in cps.policies].index("plain")]
    assert plain.matches("k", "support") and not plain.matches("k", "support", "acme")


def test_team_entries_need_a_team_and_an_org() -> None:
    got = bad(policy("p", match="{teams: [ok, /support, 'acme/']}"))
    assert [(line, path) for line, path, _ in got] == [(4, "match.teams[1]"), (4, "match.teams[2]")]
    assert got[0][2] == "team '/support' must be a team name or org/team"


def test_compiled_rules_carry_the_policy_level() -> None:
    body = """tools:
  allow:
    t:
      schema: {type: object}
      rules: [{id: r, when: 'true', action: deny}]
output:
  schema: {type: object}
  rules: [{id: o, when: 'true', action: deny}]
  deny_patterns: [{id: d, regex: x}]
"""
    cps = ok(policy("org", body), policy("team", body, match="{teams: [t]}"), policy("key", body, match="{keys: [k]}"))
    for cp, level in zip(cps.policies, (0, 1, 2), strict=True):
        assert cp.tool_rules["t"][0].level == level and cp.tool_schemas["t"].level == level
        assert cp.output_rules[0].level == level and cp.deny_patterns[0].level == level
        assert cp.output_schema is not None and cp.output_schema.level == level


# --- deny globs: case, size ------------------------------------------------------


def test_deny_globs_and_names_match_any_case_allow_stays_exact() -> None:
    org = policy("org", "tools:\n  deny: ['delete_*', drop_db]\n")
    key = policy("key", "tools:\n  default: deny\n  allow:\n    apply_credit: {}\n", match="{keys: [k1]}")
    cps = ok(org, key)
    gate = cps.policies[0].gate
    for name in ("delete_account", "Delete_account", "DELETE_ACCOUNT", "drop_db", "DROP_DB", "Drop_Db"):
        assert gate.blocks(name), name
    assert not gate.blocks("undelete_x") and not gate.blocks("drop_dbs")
    eff = cps.for_principal("k1", None)
    assert eff.tool_blocked("Apply_Credit")[0] is not None and eff.tool_blocked("apply_credit") == (None, None)
    enforced, _ = eff.tool_blocked("DELETE_ACCOUNT")
    assert enforced is not None and enforced.policy == "org"


def test_escalate_to_matched_by_own_deny_in_another_case() -> None:
    got = bad(policy("p", "tools:\n  escalate_to: Escalate_Human\n  deny: ['escalate_*']\n"),
              policy("q", "tools:\n  escalate_to: human\n  deny: [HUMAN]\n"))
    assert [(line, path) for line, path, _ in got] == [(7, "tools.escalate_to"), (7, "tools.escalate_to")]


def test_too_many_wildcard_deny_globs_are_a_located_error() -> None:
    globs = ", ".join(f"'*{i}*x*'" for i in range(20_000))
    got = bad(policy("p", f"tools:\n  deny: [{globs}, plain_name]\n"))
    assert got == [(7, "tools.deny", "20000 patterns with * or ?; at most 1000 per policy (plain names are not "
                                     "limited)")]


def test_deny_globs_too_large_for_re2_are_a_located_error() -> None:
    got = bad(policy("p", "tools:\n  deny: ['" + "?" * 100_000 + "']\n"))
    assert [(line, path) for line, path, _ in got] == [(7, "tools.deny")]
    assert got[0][2].startswith("the 1 patterns with * or ? do not compile together (pattern too large")


def test_many_plain_deny_names_and_the_glob_cap_compile() -> None:
    names = ", ".join(f"tool_{i}" for i in range(20_000))
    globs = ", ".join(f"'*{i}*x*'" for i in range(1000))
    gate = ok(policy("p", f"tools:\n  deny: [{names}, {globs}]\n")).policies[0].gate
    assert gate.blocks("tool_19999") and gate.blocks("TOOL_0") and not gate.blocks("tool_20000")
    assert gate.blocks("a999bXc") and not gate.blocks("a1000bc")


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
    assert msgs[1] == "temperature max 2 is looser than org's temperature max 1, which applies"
    assert msgs[2] == "temperature min 0 is looser than org's temperature min 0.1, which applies"
    assert msgs[3] == "tool 'delete_user' is denied by org; it stays denied"
    assert msgs[4] == "per_request_usd is looser than org's; the lower applies"
    # Warnings do not stop the set from compiling, and the stricter limits still apply.
    assert str(ok(ORG, key).warnings[0]).startswith("1.yaml:7: [models.allow] warning: ")


def test_unset_limits_in_narrow_policy_are_looser() -> None:
    team = policy("team", "models:\n  params:\n    temperature: {max: 0.5}\n", match="{teams: [t]}")
    got = warnings_of(ORG, team)
    assert [m for *_, m in got] == ["temperature has no min here; org's temperature min 0.1 applies"]
    team2 = policy("team", "models:\n  params:\n    temperature: {min: 0.5}\n", match="{teams: [t]}")
    assert [m for *_, m in warnings_of(ORG, team2)] == [
        "temperature has no max here; org's temperature max 1 applies"
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


# --- contradicting limits are load errors -------------------------------------------------------------

ORG_LIMITS = policy("org", "models:\n  params:\n    temperature: {max: 1.0}\n    max_tokens: {max: 256}\n")
TEAM_LIMITS = policy("team", "models:\n  params:\n    temperature: {min: 1.9}\n"
                             "    max_completion_tokens: {min: 4000}\n", match="{teams: [support]}")


def test_team_min_above_org_max_is_a_located_error() -> None:
    got = bad(ORG_LIMITS, TEAM_LIMITS)
    assert got == [
        (8, "models.params.temperature", "team's temperature min 1.9 is above org's temperature max 1: no value "
                                         "satisfies both (a narrower policy cannot loosen a broader one)"),
        # Both token names are one limit.
        (9, "models.params.max_completion_tokens", "team's max_completion_tokens min 4000 is above org's "
                                                    "max_tokens max 256: no value satisfies both (a narrower "
                                                    "policy cannot loosen a broader one)"),
    ]
    cps, errors = compile_docs(ORG_LIMITS, TEAM_LIMITS)
    assert cps is None and {e.source for e in errors} == {"1.yaml"} and all(e.severity == "error" for e in errors)


def test_the_error_is_on_the_narrower_policy_whichever_side_it_bounds() -> None:
    org = policy("org", "models:\n  params:\n    top_p: {min: 0.5}\n")
    key = policy("key", "models:\n  params:\n    top_p: {max: 0.2}\n", match="{keys: [k]}")
    ((line, path, msg),) = bad(key, org)
    assert (line, path) == (8, "models.params.top_p")
    assert msg.startswith("org's top_p min 0.5 is above key's top_p max 0.2")


def test_same_level_pairs_and_a_policy_with_itself() -> None:
    a = policy("a", "models:\n  params:\n    temperature: {max: 0.5}\n")
    b = policy("b", "models:\n  params:\n    temperature: {min: 0.7}\n")
    assert [(src, path) for src, _, path, _ in _located(a, b)] == [("1.yaml", "models.params.temperature")]
    both_names = policy("s", "models:\n  params:\n    max_tokens: {max: 256}\n    max_completion_tokens: {min: 300}\n")
    ((_, path, msg),) = bad(both_names)
    assert path == "models.params.max_completion_tokens" and msg == (
        "s's max_completion_tokens min 300 is above s's max_tokens max 256: no value satisfies both")
    fraction = policy("f", "models:\n  params:\n    max_tokens: {min: 10.2, max: 10.8}\n")
    ((_, path, msg),) = bad(fraction)
    assert (path, msg) == ("models.params.max_tokens",
                           "no whole number of tokens lies between f's max_tokens min 10.2 and f's max_tokens max 10.8")


def test_a_broad_policy_contradicting_itself_is_reported_once_on_its_own_file() -> None:
    org = policy("org", "models:\n  params:\n    max_tokens: {max: 100}\n    max_completion_tokens: {min: 200}\n")
    # The team's own max does not conflict with the org's min: only the org's file is named.
    team = policy("team", "models:\n  params:\n    max_tokens: {max: 300}\n", match="{teams: [t]}")
    assert [(src, path) for src, _, path, _ in _located(org, team)] == [
        ("0.yaml", "models.params.max_completion_tokens")]


DISJOINT = [("{keys: [k1]}", "{keys: [k2]}"), ("{teams: [support]}", "{teams: [acme/support]}"),
            ("{teams: [t1, t2]}", "{teams: [t3]}")]
CO_APPLYING = [
    ("{keys: [k1]}", "{keys: [k1, k2]}"),
    ("{keys: [k1]}", "{teams: [t1]}"),  # k1 may be in t1: a key's team is not known to the policies
    ("{teams: [t1]}", "{keys: [k2]}"),
    ("{teams: [support]}", "{teams: [default/support]}"),
    ("{all: true}", "{keys: [k9]}"),
]


def test_only_provably_disjoint_policies_may_contradict() -> None:
    for first, second in DISJOINT + CO_APPLYING:
        lo = policy("lo", "models:\n  params:\n    temperature: {max: 0.5}\n", match=first)
        hi = policy("hi", "models:\n  params:\n    temperature: {min: 0.7}\n", match=second)
        cps, errors = compile_docs(lo, hi)
        assert (cps is None) == ((first, second) in CO_APPLYING), (first, second, errors)
    # A shadow policy enforces nothing, so it contradicts nothing.
    shadow = policy("team", TEAM_LIMITS.split("mode: enforce\n", 1)[1], match="{teams: [support]}", mode="shadow")
    ok(ORG_LIMITS, shadow)


def test_token_limits_under_either_name_are_compared_for_loosening() -> None:
    org = policy("org", "models:\n  params:\n    max_tokens: {max: 4096, min: 16}\n")
    key = policy("key", "models:\n  params:\n    max_completion_tokens: {max: 8000}\n", match="{keys: [k]}")
    assert [(path, m) for _, _, path, m in warnings_of(org, key)] == [
        ("models.params.max_completion_tokens",
         "max_completion_tokens max 8000 is looser than org's max_tokens max 4096, which applies"),
        ("models.params.max_completion_tokens",
         "max_completion_tokens has no min here; org's max_tokens min 16 applies"),
    ]
    tight = policy("key", "models:\n  params:\n    max_completion_tokens: {max: 100, min: 16}\n", match="{keys: [k]}")
    assert warnings_of(org, tight) == []


def _located(*docs: str) -> list[tuple[str, int | None, str, str]]:
    cps, errors = compile_docs(*docs)
    assert cps is None
    return [(e.source, e.line, e.path, e.message) for e in errors]
