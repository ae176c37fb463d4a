"""rules.precheck: CEL, RE2 and JSON-schema errors in a document that failed validation, worded as the compiler
words them, so one ``guardproxy check`` run reports the unknown field and everything else in the file."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from policy_builders import compile_docs, policy

from rules.loader import load_policies
from rules.precheck import precheck
from rules.yamlsrc import Located, SourceError

# Shape-valid, so the compiler sees it; every compile-stage check that precheck covers fails once.
BROKEN = """tools:
  escalate_to: escalate_to_human
  allow:
    escalate_to_human: {}
    refund:
      schema: {type: objekt}
      rules:
        - {id: ok-rule, when: "double(args.amount) > 5.0", action: deny}
        - {id: bad-rule, when: "args.amount >> 5", action: deny}
output:
  rules:
    - {id: bad-out, when: "output.x ==", action: deny}
    - {id: not-bool, when: "1 + 2", action: deny}
  schema: {type: [1]}
  deny_patterns:
    - {id: ok-re, regex: "ssn-\\\\d+"}
    - {id: bad-re, regex: "(unclosed"}
"""


def as_tuples(errors: list[SourceError]) -> list[tuple[str, int | None, str, str]]:
    return sorted((e.source, e.line, e.path, e.message) for e in errors)


def test_precheck_words_errors_exactly_as_the_compiler() -> None:
    text = policy("p", BROKEN)
    _, compiler_errors = compile_docs(text)
    compiled_paths = {e.path for e in compiler_errors}
    covered = {"tools.allow.refund.schema", "tools.allow.refund.rules[1].when", "output.rules[0].when",
               "output.rules[1].when", "output.schema", "output.deny_patterns[1].regex"}
    assert covered <= compiled_paths, compiler_errors
    # The same file with an unknown field fails validation, so the compiler never sees it: precheck does.
    broken = text.replace("  escalate_to: escalate_to_human\n", "  escalat_to: escalate_to_human\n")
    loaded = load_policies([("0.yaml", broken)])
    assert [e.message for e in loaded.errors] == ["unknown field"] and loaded.policies == []
    (located,) = loaded.rejected
    got = precheck(located)
    assert as_tuples(got) == as_tuples([e for e in compiler_errors if e.path in covered])


def test_precheck_skips_values_validation_already_refused() -> None:
    text = policy("p", "tools:\n  allow:\n    t:\n      rules:\n        - {id: r, when: 7, action: deny}\n"
                       "        - {id: s, when: '', action: deny}\n"
                       "output:\n  schema: [not, a, mapping]\n  deny_patterns:\n    - {id: e, regex: ''}\n"
                       "    - {id: f, regex: '(x', bogus: 1}\n")
    loaded = load_policies([("0.yaml", text)])
    (located,) = loaded.rejected
    # Only the one value validation did not refuse (the regex of an entry with an unknown sibling) is compiled.
    got = precheck(located, reported=loaded.errors)
    assert [(e.path, e.message.split(":")[0]) for e in got] == [("output.deny_patterns[1].regex", "invalid RE2 regex")]
    # An error already reported at or below a value keeps that value out of the precheck.
    again = precheck(located, reported=[*loaded.errors, *got])
    assert again == []


def test_precheck_of_a_valid_document_finds_nothing() -> None:
    loaded = load_policies([("0.yaml", policy("p", BROKEN.replace(">> 5", "> 5").replace("objekt", "object")
                                               .replace("output.x ==", "true").replace("1 + 2", "false")
                                               .replace("[1]", "object").replace("(unclosed", "(closed)")))])
    (lp,) = loaded.policies
    assert precheck(lp.located) == []


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["tools", "allow", "rules", "when", "schema", "output", "deny_patterns", "regex", "x"]),
        inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(tools=json_like, output=json_like)
def test_precheck_never_raises_on_any_shape(tools: Any, output: Any) -> None:
    got = precheck(Located("h.yaml", {"tools": tools, "output": output}))
    assert all(isinstance(e, SourceError) and e.source == "h.yaml" for e in got)
