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

from conftest import ROOT

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
