"""``guardproxy test``: the shipped policy cases pass, a wrong expectation fails with a diff,
a malformed case file is reported with file and line; plus the case judge's comparison rules."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.policy_source import build
from proxy.policy_tests import load_cases
from rules.compiler import CompiledPolicySet
from rules.testing import CaseFile, RequestCase, ResponseCase, judge

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", "test", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def policy_copy(tmp_path: Path) -> Path:
    """policies/*.yaml and policies/tests/ copied into tmp_path/policies."""
    dst = tmp_path / "policies"
    (dst / "tests").mkdir(parents=True)
    for f in POLICIES.glob("*.yaml"):
        shutil.copy(f, dst / f.name)
    for f in (POLICIES / "tests").glob("*.yaml"):
        shutil.copy(f, dst / "tests" / f.name)
    return dst


@pytest.fixture(scope="module")
def compiled() -> CompiledPolicySet:
    cs, errors, _ = build([POLICIES])
    assert cs is not None, errors
    return cs


def test_shipped_cases_pass() -> None:
    res = run_cli("policies/tests")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "FAIL" not in res.stdout
    assert " passed, 0 failed" in res.stdout
    assert "PASS support apply_credit of 75 is escalated to a human" in res.stdout


def test_shipped_case_files_are_yaml_only() -> None:
    # pytest collects policies/tests too (testpaths): nothing there may be a Python module.
    files = list((POLICIES / "tests").iterdir())
    assert {f.name for f in files} >= {"support-agent_test.yaml", "org-base_test.yaml"}
    assert all(f.suffix in (".yaml", ".yml") for f in files)


def test_wrong_expectation_fails_with_diff_naming_case_and_field(tmp_path: Path) -> None:
    pol = policy_copy(tmp_path)
    case_file = pol / "tests" / "support-agent_test.yaml"
    text = case_file.read_text()
    wrong = "verdict: escalate, rule_id: credit-over-50-needs-human"
    assert text.count(wrong) == 1
    case_file.write_text(text.replace(wrong, "verdict: allow, rule_id: credit-over-50-needs-human"))
    res = run_cli(str(pol / "tests"))
    assert res.returncode == 1, res.stdout + res.stderr
    out = res.stdout
    assert f"FAIL support apply_credit of 75 is escalated to a human ({case_file}:" in out
    assert "--- expected" in out and "+++ actual" in out
    assert "-  verdict: allow" in out and "+  verdict: escalate" in out
    assert out.count("FAIL ") == 1
    assert ", 1 failed" in out.splitlines()[-1]


def test_malformed_case_file_exits_2_with_file_and_line(tmp_path: Path) -> None:
    pol = policy_copy(tmp_path)
    bad = pol / "tests" / "bad_test.yaml"
    bad.write_text(
        "cases:\n"
        "  - name: typo in the decision\n"
        "    principal: {key: support-agent}\n"
        "    request: {model: gpt-4o}\n"
        "    expect: {decision: alow}\n"
    )
    res = run_cli(str(pol / "tests"))
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"{bad}:5:" in res.stdout
    assert "cases[0].expect.decision" in res.stdout
    assert "PASS" not in res.stdout  # nothing runs when a case file is broken


def test_policy_dir_defaults_to_parent_and_can_be_given(tmp_path: Path) -> None:
    cases = tmp_path / "elsewhere"
    cases.mkdir()
    shutil.copy(POLICIES / "tests" / "org-base_test.yaml", cases / "org-base_test.yaml")
    # The parent of `elsewhere` holds no policies: an error, not a silent pass.
    assert run_cli(str(cases)).returncode == 2
    res = run_cli(str(cases), "--policies", str(POLICIES))
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("cases:\n  - name: a\n    principal: {key: x\n", 4, "invalid YAML"),
        ("cases:\n  - name: a\n    principal: {key: x}\n    expect: {decision: allow}\n", 2,
         "exactly one of request: or response:"),
        ("cases:\n  - name: a\n    principal: {key: x}\n    response: {content: hi, bogus: 1}\n"
         "    expect: {decision: allow}\n", 4, "unknown field"),
        ("cases:\n  - name: a\n    principal: {key: x}\n    response: {content: hi}\n"
         "    expect: {decision: allow, calls: [{name: t}]}\n", 5, "missing required field 'verdict'"),
        ("cases:\n  - {name: a, principal: {key: x}, request: {}, expect: {decision: allow}}\n"
         "  - {name: a, principal: {key: x}, request: {}, expect: {decision: allow}}\n", 3, "duplicate case name"),
        ("cases: []\n", 1, "no cases"),
        ("# nothing here\n", 1, "must be a mapping"),
    ],
)
def test_case_file_errors_are_located(tmp_path: Path, text: str, line: int, needle: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    cases, errors = load_cases([f])
    assert len(errors) == 1, errors
    assert errors[0].line == line and needle in str(errors[0]), str(errors[0])


def _case(doc: dict[str, Any]) -> RequestCase | ResponseCase:
    return CaseFile.model_validate({"cases": [doc]}).cases[0]


def test_sets_ignore_order_but_tools_do_not(compiled: CompiledPolicySet) -> None:
    base = {"name": "n", "principal": {"key": "playground", "team": "sandbox"},
            "request": {"model": "gpt-4o-mini", "max_tokens": 10, "tools": [
                {"type": "function", "function": {"name": n}} for n in ("delete_a", "b", "drop_c", "a")]}}
    ok = judge(compiled, _case({**base, "expect": {
        "decision": "modify", "actions": ["tool_stripped:drop_c", "tool_stripped:delete_a"], "tools": ["b", "a"]}}))
    assert ok.passed
    swapped = judge(compiled, _case({**base, "expect": {"decision": "modify", "tools": ["a", "b"]}}))
    assert not swapped.passed and swapped.actual["tools"] == ["b", "a"]


def test_true_is_not_one(compiled: CompiledPolicySet) -> None:
    doc: dict[str, Any] = {"name": "n", "principal": {"key": "support-agent", "team": "support"},
                           "response": {"content": {"action": "resolve", "reason": "r", "confidence": 0.5,
                                    "requires_human_review": False}}}
    strict: dict[str, Any] = {"decision": "modify", "output": {
        "verdict": "rewrite", "content_contains": {"requires_human_review": 1}}}
    assert not judge(compiled, _case({**doc, "expect": strict})).passed
    strict["output"]["content_contains"]["requires_human_review"] = True
    assert judge(compiled, _case({**doc, "expect": strict})).passed


def test_extra_actual_calls_show_in_the_diff(compiled: CompiledPolicySet) -> None:
    doc = {"name": "n", "principal": {"key": "support-agent", "team": "support"},
           "response": {"tool_calls": [{"name": "get_ticket_history", "arguments": {}},
                                       {"name": "refund_order", "arguments": {}}]},
           "expect": {"decision": "modify", "calls": [{"name": "get_ticket_history", "verdict": "allow"}]}}
    result = judge(compiled, _case(doc))
    assert not result.passed
    assert result.actual["calls"][1] == {"name": "refund_order", "verdict": "deny"}
