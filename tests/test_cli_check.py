"""``guardproxy check``: validates the config and every policy, reports all errors with file:line, exits 1.

Each case runs the real command (``python -m proxy.cli check --config ...``) in a subprocess on files
written to a temp folder, the way an operator or a CI job would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ALIAS_BOMB, ROOT, cap_memory

MODELS = """models:
  - {name: gpt-4o-mini, upstream: openai/gpt-4o-mini}
"""

BROKEN_CONFIG = """server:
  host: 127.0.0.1
  port: abc
  colour: blue
policies: [policies/]
models:
  - name: gpt-4o-mini
    upstream: openai/gpt-4o-mini
    api_key: ${GP_TEST_MISSING_VAR}
"""

# One file per problem would hide nothing either, but the compile-stage errors share a file on
# purpose: the compiler must keep going after the first one.
BROKEN_POLICY = """apiVersion: guardproxy/v1
kind: Policy
metadata:
  name: broken-compile
match: {all: true}
tools:
  default: deny
  escalate_to: escalate_to_human
  allow:
    lookup_order:
      schema:
        type: objekt
      rules:
        - id: bad-cel
          when: "args.amount >> 5"
          action: deny
output:
  deny_patterns:
    - {id: bad-re, regex: "(unclosed"}
"""

# An unknown field fails the whole document's validation, so it lives in its own file.
UNKNOWN_FIELD_POLICY = """apiVersion: guardproxy/v1
kind: Policy
metadata:
  name: broken-schema
match: {all: true}
toolz: {}
"""


def run_check(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    penv = {k: v for k, v in os.environ.items() if k != "GP_TEST_MISSING_VAR" and not k.startswith("GUARDPROXY_")}
    penv.update(env or {})
    return subprocess.run([sys.executable, "-m", "proxy.cli", "check", "--config", str(config)],
                          cwd=config.parent, env=penv, capture_output=True, text=True, timeout=60)


def error_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("error: ")]


def write_setup(tmp_path: Path, config: str, policies: dict[str, str]) -> Path:
    (tmp_path / "policies").mkdir()
    for name, text in policies.items():
        (tmp_path / "policies" / name).write_text(text)
    cfg = tmp_path / "guardproxy.yaml"
    cfg.write_text(config)
    return cfg


def test_repo_config_is_valid() -> None:
    result = run_check(ROOT / "guardproxy.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok: config")
    m = re.search(r"(\d+) policies, revision ([0-9a-f]{12})", result.stdout)
    assert m is not None and int(m.group(1)) == len(list((ROOT / "policies").glob("*.yaml")))
    assert error_lines(result.stdout) == []


def test_config_from_environment_variable(tmp_path: Path) -> None:
    """Without ``--config`` the command reads ``$GUARDPROXY_CONFIG``."""
    cfg = write_setup(tmp_path, "policies: [policies/]\n" + MODELS, {})
    result = subprocess.run([sys.executable, "-m", "proxy.cli", "check"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "GUARDPROXY_CONFIG": str(cfg)}, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(cfg) in result.stdout


def test_broken_config_reports_every_error_with_line(tmp_path: Path) -> None:
    cfg = write_setup(tmp_path, BROKEN_CONFIG, {})
    result = run_check(cfg)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = error_lines(result.stdout)
    assert len(errors) == 3, result.stdout
    expect = {
        3: ("server.port", "integer"),
        4: ("server.colour", "unknown field"),
        9: ("models[0].api_key", "GP_TEST_MISSING_VAR is not set"),
    }
    for line, (path, words) in expect.items():
        hits = [e for e in errors if e.startswith(f"error: {cfg}:{line}: [{path}]")]
        assert len(hits) == 1, (line, result.stdout)
        assert words in hits[0]
    assert "3 error(s)" in result.stdout


def test_missing_variable_with_default_is_fine(tmp_path: Path) -> None:
    text = "policies: [policies/]\nstore: ${GP_TEST_MISSING_VAR:-memory}\n" + MODELS
    result = run_check(write_setup(tmp_path, text, {}))
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    cfg = write_setup(tmp_path, "policies: [policies/\n" + MODELS, {})
    result = run_check(cfg)
    assert result.returncode == 1
    errors = error_lines(result.stdout)
    assert len(errors) == 1 and re.match(rf"error: {re.escape(str(cfg))}:\d+: .*invalid YAML", errors[0]), errors


def test_broken_policies_report_every_error_with_line(tmp_path: Path) -> None:
    cfg = write_setup(tmp_path, "policies: [policies/]\n" + MODELS,
                      {"compile.yaml": BROKEN_POLICY, "schema.yaml": UNKNOWN_FIELD_POLICY})
    result = run_check(cfg)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = error_lines(result.stdout)
    compile_src, schema_src = tmp_path / "policies" / "compile.yaml", tmp_path / "policies" / "schema.yaml"
    expect = [
        (f"{schema_src}:6: [toolz]", "unknown field"),
        (f"{compile_src}:8: [tools.escalate_to]", "escalate_to_human"),
        (f"{compile_src}:15: [tools.allow.lookup_order.rules[0].when]", "invalid CEL (column "),
        (f"{compile_src}:11: [tools.allow.lookup_order.schema]", "invalid JSON schema"),
        (f"{compile_src}:19: [output.deny_patterns[0].regex]", "invalid RE2 regex"),
    ]
    for where, words in expect:
        hits = [e for e in errors if e.startswith(f"error: {where}")]
        assert len(hits) == 1, (where, result.stdout)
        assert words in hits[0], hits[0]
    assert len(errors) == len(expect), result.stdout
    assert f"{len(expect)} error(s)" in result.stdout


def test_cel_error_column_points_at_the_problem(tmp_path: Path) -> None:
    cfg = write_setup(tmp_path, "policies: [policies/]\n" + MODELS, {"compile.yaml": BROKEN_POLICY})
    out = run_check(cfg).stdout
    m = re.search(r"invalid CEL \(column (\d+)\)", out)
    assert m is not None, out
    # "args.amount >> 5": the parser trips on the second '>' (0-based 13 or 1-based 14)
    assert int(m.group(1)) in (13, 14)


def test_valid_custom_setup_passes(tmp_path: Path) -> None:
    policy = BROKEN_POLICY.replace("type: objekt", "type: object").replace(">> 5", "> 5").replace(
        "(unclosed", "(closed)").replace("lookup_order:", "escalate_to_human: {}\n    lookup_order:")
    result = run_check(write_setup(tmp_path, "policies: [policies/]\n" + MODELS, {"p.yaml": policy}))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 policies" in result.stdout


# --- every error in one run, hostile files, missing paths, unknown principals (hardening rounds 1 and 2) -----

THREE_ERRORS = """apiVersion: guardproxy/v1
kind: Policy
metadata:
  name: three
match: {all: true}
tools:
  escalat_to: escalate_to_human
  allow:
    lookup_order:
      rules:
        - id: bad-cel
          when: "args.amount >> 5"
          action: deny
output:
  deny_patterns:
    - {id: bad-re, regex: "(unclosed"}
"""

KEYS = """keys:
  - {id: support-agent, key: sk-a, team: support}
  - {id: ops-bot, key: sk-b, team: ops, org: acme}
"""

PRINCIPALS = """apiVersion: guardproxy/v1
kind: Policy
metadata: {name: principals}
match:
  keys: [support-agent, suport-agent]
  teams: [support, acme/ops, acme/support, sales]
models:
  allow: [gpt-4o-mini, gpt-5]
"""

def run_limited(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``guardproxy check`` with its address space capped, so a bound that fails cannot eat the machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDPROXY_")}
    return subprocess.run([sys.executable, "-m", "proxy.cli", "check", "--config", str(config), *args],
                          cwd=config.parent, env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=cap_memory)


def test_three_independent_errors_in_one_file_are_all_reported(tmp_path: Path) -> None:
    cfg = write_setup(tmp_path, "policies: [policies/]\n" + MODELS, {"three.yaml": THREE_ERRORS})
    result = run_check(cfg)
    assert result.returncode == 1, result.stdout + result.stderr
    f = tmp_path / "policies" / "three.yaml"
    errors = error_lines(result.stdout)
    assert len(errors) == 3, result.stdout
    assert errors[0] == f"error: {f}:7: [tools.escalat_to] unknown field"
    assert errors[1].startswith(f"error: {f}:12: [tools.allow.lookup_order.rules[0].when] invalid CEL (column ")
    assert errors[2].startswith(f"error: {f}:16: [output.deny_patterns[0].regex] invalid RE2 regex: ")
    assert result.stdout.splitlines()[-1] == "3 error(s)"


def test_a_config_typo_does_not_hide_the_policy_errors(tmp_path: Path) -> None:
    cfg = write_setup(tmp_path, "policies: [policies/]\nstore: memroy\n" + MODELS, {"three.yaml": THREE_ERRORS})
    result = run_check(cfg)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = error_lines(result.stdout)
    assert errors[0].startswith(f"error: {cfg}:2: [store] ") and "unknown store 'memroy'" in errors[0]
    assert len(errors) == 4 and all("three.yaml" in e for e in errors[1:]), result.stdout
    assert result.stdout.splitlines()[-1] == "4 error(s)"


def test_alias_bomb_is_refused_before_expansion_in_little_memory(tmp_path: Path) -> None:
    assert len(ALIAS_BOMB) < 600
    cfg = write_setup(tmp_path, "policies: [policies/]\n" + MODELS, {"bomb.yaml": ALIAS_BOMB})
    result = run_limited(cfg)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr
    f = tmp_path / "policies" / "bomb.yaml"
    # d stands for 11,111 nodes: the 8th alias of it, on line 5, takes the file past the 100,000-node bound.
    assert error_lines(result.stdout) == [
        f"error: {f}:5: the document expands to more than 100000 nodes through aliases (at alias *d)"]


def test_alias_bomb_in_the_config_file_is_refused(tmp_path: Path) -> None:
    cfg = write_setup(tmp_path, "policies: [policies/]\n" + MODELS + ALIAS_BOMB.replace("a: &a", "x-a: &a"), {})
    result = run_limited(cfg)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    (err,) = error_lines(result.stdout)
    assert err.startswith(f"error: {cfg}:8: the document expands to more than 100000 nodes"), err


def test_600_nesting_levels_are_a_located_error(tmp_path: Path) -> None:
    deep = THREE_ERRORS.split("tools:")[0] + "x: " + "[" * 600 + "]" * 600 + "\n"
    cfg = write_setup(tmp_path, "policies: [policies/]\n" + MODELS, {"deep.yaml": deep, "ok.yaml": PRINCIPALS})
    result = run_check(cfg)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    f = tmp_path / "policies" / "deep.yaml"
    assert error_lines(result.stdout) == [f"error: {f}:6: nesting deeper than 64 levels"]


def test_a_missing_policy_path_is_an_error(tmp_path: Path) -> None:
    cfg = write_setup(tmp_path, "policies: [policies/, polciies/]\n" + MODELS, {"p.yaml": PRINCIPALS})
    result = run_check(cfg)
    assert result.returncode == 1, result.stdout + result.stderr
    assert error_lines(result.stdout) == [f"error: {tmp_path / 'polciies'}: policy path does not exist"]
    assert "ok:" not in result.stdout


def test_an_empty_policy_folder_is_allowed_with_a_warning(tmp_path: Path) -> None:
    cfg = write_setup(tmp_path, "policies: [policies/]\n" + MODELS, {})
    result = run_check(cfg)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{tmp_path / 'policies'}: warning: no policies: every request is allowed" in result.stdout.splitlines()
    assert "0 policies" in result.stdout


def test_unknown_key_ids_teams_and_models_are_warnings(tmp_path: Path) -> None:
    cfg = write_setup(tmp_path, "policies: [policies/]\n" + MODELS + KEYS, {"p.yaml": PRINCIPALS})
    result = run_check(cfg)
    assert result.returncode == 0, result.stdout + result.stderr
    f = tmp_path / "policies" / "p.yaml"
    warnings = [ln for ln in result.stdout.splitlines() if " warning: " in ln]
    assert warnings == [
        f"{f}:5: [match.keys[1]] warning: key id 'suport-agent' is not configured (no keys[].id); "
        "this entry matches no caller",
        f"{f}:6: [match.teams[2]] warning: team 'acme/support' is not configured (no key has team 'support' "
        "in org 'acme'); this entry matches no caller",
        f"{f}:6: [match.teams[3]] warning: team 'sales' is not configured (no key has team 'sales' "
        "in org 'default'); this entry matches no caller",
        f"{f}:8: [models.allow[1]] warning: model 'gpt-5' is not served by any route (models[].name)",
    ]
    assert error_lines(result.stdout) == []
    assert result.stdout.splitlines()[-1].startswith("ok: config ") and "4 warning(s)" in result.stdout


def test_strict_turns_warnings_into_errors(tmp_path: Path) -> None:
    cfg = write_setup(tmp_path, "policies: [policies/]\n" + MODELS + KEYS, {"p.yaml": PRINCIPALS})
    result = run_limited(cfg, "--strict")
    assert result.returncode == 1, result.stdout + result.stderr
    f = tmp_path / "policies" / "p.yaml"
    errors = error_lines(result.stdout)
    assert errors[0] == (f"error: {f}:5: [match.keys[1]] key id 'suport-agent' is not configured (no keys[].id); "
                         "this entry matches no caller")
    assert len(errors) == 4 and not any(" warning: " in ln for ln in result.stdout.splitlines())
    assert result.stdout.splitlines()[-1] == "4 error(s)"


def test_twenty_thousand_deny_globs_are_a_located_error(tmp_path: Path) -> None:
    globs = "".join(f"    - t{i:06d}_some_long_tool_name_*\n" for i in range(20_000))
    text = THREE_ERRORS.split("tools:")[0] + "tools:\n  deny:\n" + globs
    cfg = write_setup(tmp_path, "policies: [policies/]\n" + MODELS, {"many.yaml": text, "ok.yaml": PRINCIPALS})
    result = run_check(cfg)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    (err,) = error_lines(result.stdout)
    assert err.startswith(f"error: {tmp_path / 'policies' / 'many.yaml'}:"), err
    assert result.stdout.splitlines()[-1] == "1 error(s)"
