"""rules.loader and rules.model: policy text to frozen models, every error with file and line."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rules.loader import load_policies, parse_policy
from rules.model import Policy
from rules.yamlsrc import SourceError

HEAD = "apiVersion: guardproxy/v1\nkind: Policy\nmetadata:\n  name: {name}\nmatch: {{all: true}}\n"


def doc(body: str = "", name: str = "p") -> str:
    return HEAD.format(name=name) + body


def errs(text: str, source: str = "pol.yaml") -> list[tuple[int | None, str, str]]:
    result = load_policies([(source, text)])
    assert result.policies == []
    return [(e.line, e.path, e.message) for e in result.errors]


def test_minimal_policy_loads_with_defaults() -> None:
    result = load_policies([("a.yaml", doc())])
    assert result.errors == []
    (lp,) = result.policies
    p = lp.policy
    assert p.metadata.name == "p" and p.mode == "enforce" and p.on_store_error == "fail_closed"
    assert p.models.allow is None and p.tools.default == "allow" and p.cost is None
    assert lp.located.source == "a.yaml"
    with pytest.raises(ValidationError):
        p.mode = "shadow"  # frozen


def test_unknown_top_level_field_has_file_and_line() -> None:
    assert errs(doc("modle: {}\n")) == [(6, "modle", "unknown field")]


def test_unknown_nested_field_has_line() -> None:
    text = doc(
        "tools:\n"
        "  allow:\n"
        "    refund:\n"
        "      rules:\n"
        "        - id: r1\n"
        "          when: 'true'\n"
        "          action: deny\n"
        "          reasn: typo\n"
    )
    assert errs(text) == [(13, "tools.allow.refund.rules[0].reasn", "unknown field")]
    result = load_policies([("pol.yaml", text)])
    assert str(result.errors[0]) == "pol.yaml:13: [tools.allow.refund.rules[0].reasn] unknown field"


def test_bad_types_have_lines() -> None:
    text = doc("mode: loud\nmodels:\n  params:\n    temperature: {max: hot}\ntools:\n  default: maybe\n")
    got = errs(text)
    assert [(line, path) for line, path, _ in got] == [
        (6, "mode"), (9, "models.params.temperature.max"), (11, "tools.default")
    ]
    assert "'enforce' or 'shadow'" in got[0][2]


def test_missing_required_field_is_reported_at_parent() -> None:
    text = "apiVersion: guardproxy/v1\nkind: Policy\nmetadata:\n  description: x\nmatch: {all: true}\n"
    assert errs(text) == [(3, "metadata", "Field required")]


def test_bad_name_pattern() -> None:
    ((line, path, msg),) = errs(doc(name="'has space'"))
    assert (line, path) == (4, "metadata.name") and "pattern" in msg


def test_invalid_yaml_has_line() -> None:
    ((line, path, msg),) = errs(doc("tools: [\n"))
    assert line is not None and line >= 6 and msg.startswith("invalid YAML")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", ""])
def test_non_mapping_document(text: str) -> None:
    assert errs(text) == [(1, "", "a policy file must be a YAML mapping")]


def test_duplicate_policy_names_across_files() -> None:
    result = load_policies([("a.yaml", doc(name="same")), ("b.yaml", doc(name="same"))])
    assert [lp.located.source for lp in result.policies] == ["a.yaml"]
    (e,) = result.errors
    assert (e.source, e.line, e.path) == ("b.yaml", 4, "metadata.name")
    assert e.message == "policy name 'same' is already used by a.yaml"


def test_errors_from_every_file_are_collected() -> None:
    result = load_policies([("a.yaml", doc("bogus: 1\n")), ("b.yaml", "x: [\n"), ("c.yaml", doc(name="ok"))])
    assert [e.source for e in result.errors] == ["a.yaml", "b.yaml"]
    assert [lp.policy.metadata.name for lp in result.policies] == ["ok"]


def test_parse_policy_returns_errors_not_exceptions() -> None:
    loaded, errors = parse_policy("a: 1\na: 2\n", "d.yaml")
    assert loaded is None
    # The duplicate key first, then what validating the document anyway finds.
    assert errors[0] == SourceError("d.yaml", 2, "a", "duplicate key")
    assert SourceError("d.yaml", 2, "a", "unknown field") in errors[1:]


@pytest.mark.parametrize(
    ("match", "message"),
    [
        ("{}", "match needs keys, teams or all: true"),
        ("{all: true, keys: [k]}", "match.all cannot be combined with keys or teams"),
        ("{all: false}", "match needs keys, teams or all: true"),
    ],
)
def test_match_validation(match: str, message: str) -> None:
    text = f"apiVersion: guardproxy/v1\nkind: Policy\nmetadata: {{name: p}}\nmatch: {match}\n"
    ((line, path, msg),) = errs(text)
    assert (line, path) == (4, "match") and message in msg


@pytest.mark.parametrize(
    ("limit", "message"), [("{}", "give min, max or both"), ("{min: 2, max: 1}", "min is greater than max")]
)
def test_param_limit_validation(limit: str, message: str) -> None:
    ((line, path, msg),) = errs(doc(f"models:\n  params:\n    temperature: {limit}\n"))
    assert (line, path) == (8, "models.params.temperature") and message in msg


def test_rewrite_rule_needs_set() -> None:
    text = doc("output:\n  rules:\n    - {id: r, when: 'true', action: rewrite}\n")
    ((line, path, msg),) = errs(text)
    assert (line, path) == (8, "output.rules[0]") and "action rewrite needs set" in msg


def test_tool_with_empty_spec_is_an_empty_spec() -> None:
    (lp,) = load_policies([("a.yaml", doc("tools:\n  allow:\n    lookup:\n    other: {}\n"))]).policies
    assert set(lp.policy.tools.allow) == {"lookup", "other"}
    assert lp.policy.tools.allow["lookup"].rules == ()


def test_tools_allow_not_a_mapping() -> None:
    ((line, path, _),) = errs(doc("tools:\n  allow: [a, b]\n"))
    assert (line, path) == (7, "tools.allow")


def test_schema_alias_and_levels() -> None:
    org = Policy.model_validate({"apiVersion": "guardproxy/v1", "kind": "Policy", "metadata": {"name": "o"},
                                 "match": {"all": True}})
    team = org.model_copy(update={"match": org.match.model_copy(update={"all": False, "teams": ("t",)})})
    key = org.model_copy(update={"match": org.match.model_copy(update={"all": False, "keys": ("k",)})})
    assert (org.level, team.level, key.level) == (0, 1, 2)
    (lp,) = load_policies([("a.yaml", doc("tools:\n  allow:\n    t:\n      schema: {type: object}\n"))]).policies
    assert lp.policy.tools.allow["t"].json_schema == {"type": "object"}


def test_shipped_policies_load() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "policies"
    docs = [(str(p), p.read_text()) for p in sorted(root.glob("*.yaml"))]
    result = load_policies(docs)
    assert result.errors == []
    assert {lp.policy.metadata.name for lp in result.policies} >= {"org-base", "support-agent"}


def test_documents_that_will_not_be_compiled_are_kept_for_the_precheck() -> None:
    """A later stage (rules.precheck, called by the shell) compiles what it can find in these."""
    result = load_policies([("bad.yaml", doc("bogus: 1\n")), ("syntax.yaml", "x: [\n"), ("ok.yaml", doc(name="ok")),
                            ("dup.yaml", doc(name="ok")), ("list.yaml", "- a\n")])
    assert [lp.located.source for lp in result.policies] == ["ok.yaml"]
    assert [located.source for located in result.rejected] == ["bad.yaml", "dup.yaml"]
    assert result.rejected[0].data["bogus"] == 1 and result.rejected[0].line_of(("bogus",)) == 6


def test_a_duplicate_key_does_not_hide_the_validation_errors() -> None:
    text = doc("mode: shadow\nmode: enforce\ntoolz: {}\n")
    assert errs(text) == [(7, "mode", "duplicate key"), (8, "toolz", "unknown field")]
    assert [located.source for located in load_policies([("pol.yaml", text)]).rejected] == ["pol.yaml"]


def test_hostile_documents_are_located_errors_and_the_others_still_load() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [" + ", ".join([f"*{p}"] * 10) + "]\n" for p, c in zip("abcde", "bcdef", strict=True))
    deep = "top: " + "[" * 600 + "]" * 600 + "\n"
    result = load_policies([("deep.yaml", deep), ("bomb.yaml", bomb), ("ok.yaml", doc(name="ok"))])
    assert [lp.policy.metadata.name for lp in result.policies] == ["ok"]
    assert [(e.source, e.line) for e in result.errors] == [("deep.yaml", 1), ("bomb.yaml", 5)]
    assert result.errors[0].message == "nesting deeper than 64 levels"
    assert "more than 100000 nodes" in result.errors[1].message
