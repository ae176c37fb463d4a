"""``guardproxy test [DIR]``: run the YAML policy cases in DIR against a policy folder.

The shell half of :mod:`rules.testing`: it finds and reads the case files,
compiles the policies, and prints one line per case, a diff for each failure
and a summary. Exit status: 0 all passed, 1 any case failed, 2 the cases or
policies could not be loaded (every problem printed with file and line).
"""

from __future__ import annotations

from pathlib import Path

from proxy.policy_source import build
from rules.testing import LocatedCase, judge, parse_cases, render, render_diff
from rules.yamlsrc import SourceError, YamlLoadError, load_yaml


def case_files(root: Path) -> list[Path]:
    """``root`` itself, or every ``*.yaml``/``*.yml`` below it, sorted."""
    if root.is_file():
        return [root]
    return sorted(f for f in root.rglob("*") if f.suffix in (".yaml", ".yml") and f.is_file())


def load_cases(files: list[Path]) -> tuple[list[LocatedCase], list[SourceError]]:
    """Read and validate every case file; all problems are collected."""
    cases: list[LocatedCase] = []
    errors: list[SourceError] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(SourceError(str(f), None, "", f"cannot read: {exc}"))
            continue
        try:
            located = load_yaml(text, str(f))
        except YamlLoadError as exc:
            errors.extend(exc.errors)
            continue
        found, errs = parse_cases(located)
        cases.extend(found)
        errors.extend(errs)
        if not found and not errs:
            errors.append(SourceError(str(f), 1, "cases", "no cases"))
    return cases, errors


def _where(lc: LocatedCase) -> str:
    return f"{lc.source}:{lc.line}" if lc.line else lc.source


def run_policy_tests(dir: str, policies: str | None, *, verbose: bool) -> int:
    """Run every case under ``dir``; policies from ``policies`` or the folder above ``dir``."""
    root = Path(dir)
    if not root.exists():
        print(f"error: {dir}: no such file or directory")
        return 2
    base = root.parent if root.is_dir() else root.parent.parent
    policy_dir = Path(policies) if policies else base
    files = case_files(root)
    if not files:
        print(f"error: {dir}: no case files (*.yaml)")
        return 2
    compiled, perrors, _ = build([policy_dir])
    cases, cerrors = load_cases(files)
    problems = [*perrors, *cerrors]
    if compiled is not None and not compiled.policies:
        problems.append(SourceError(str(policy_dir), None, "", "no policy files found"))
    if problems or compiled is None:
        for e in problems:
            print(f"error: {e}")
        print(f"{len(problems)} error(s) loading policies or cases")
        return 2
    passed = failed = 0
    for lc in cases:
        result = judge(compiled, lc.case)
        if result.passed:
            passed += 1
            print(f"PASS {lc.case.name}")
        else:
            failed += 1
            print(f"FAIL {lc.case.name} ({_where(lc)})")
            for line in render_diff(result.expected, result.actual):
                print(f"    {line}")
        if verbose:
            p = lc.case.principal
            print(f"    policies: {', '.join(compiled.for_principal(p.key, p.team, p.org).policy_names) or '-'}")
            for line in render(result.full):
                print(f"    | {line}")
    print(f"{passed} passed, {failed} failed (policy revision {compiled.revision})")
    return 1 if failed else 0
