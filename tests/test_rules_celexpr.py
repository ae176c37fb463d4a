"""rules.celexpr: CEL conditions compiled and type-checked once, with columns in errors."""

from __future__ import annotations

from typing import Any

import pytest

from rules.celexpr import CelCompileError, CelEvalError, Condition, compile_condition, new_env


@pytest.fixture(scope="module")
def env() -> Any:
    return new_env()


def data(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"args": {}, "output": {}, "tool": "t", "model": "m",
                            "principal": {"key": "k", "team": "", "org": "default"}}
    base.update(over)
    return base


def test_condition_over_every_variable(env: Any) -> None:
    c = compile_condition(
        env,
        "double(args.amount) > 50.0 && tool == 'apply_credit' && model.startsWith('gpt')"
        " && principal.key == 'k' && !has(output.x)",
    )
    assert isinstance(c, Condition)
    assert c.source.startswith("double(args.amount)")
    assert c.holds(data(args={"amount": 51}, tool="apply_credit", model="gpt-4o")) is True
    assert c.holds(data(args={"amount": 50}, tool="apply_credit", model="gpt-4o")) is False


def test_dyn_condition_is_accepted_and_checked_at_run_time(env: Any) -> None:
    c = compile_condition(env, "args.flag")
    assert c.holds(data(args={"flag": True})) is True
    with pytest.raises(CelEvalError, match="condition returned INT, not bool"):
        c.holds(data(args={"flag": 1}))


def test_runtime_error_is_cel_eval_error(env: Any) -> None:
    c = compile_condition(env, "args.missing > 1")
    with pytest.raises(CelEvalError, match="missing"):
        c.holds(data())
    with pytest.raises(CelEvalError, match="No matching overloads"):
        compile_condition(env, "double(args.a) > 1.0").holds(data(args={"a": None}))


def test_syntax_error_has_column(env: Any) -> None:
    with pytest.raises(CelCompileError) as info:
        compile_condition(env, "args.x >")
    assert info.value.column == 9
    assert str(info.value).startswith("Syntax error")
    assert "\n" not in str(info.value)


def test_type_error_has_column(env: Any) -> None:
    with pytest.raises(CelCompileError) as info:
        compile_condition(env, "tool == 1")
    assert info.value.column == 6
    assert "no matching overload" in str(info.value)


def test_undeclared_variable(env: Any) -> None:
    with pytest.raises(CelCompileError, match="undeclared reference to 'request") as info:
        compile_condition(env, "request.amount > 1")
    assert info.value.column is not None


@pytest.mark.parametrize(("expr", "kind"), [("1 + 1", "INT"), ("'text'", "STRING"), ("args.a + 1", "INT")])
def test_non_bool_static_type_is_refused(env: Any, expr: str, kind: str) -> None:
    with pytest.raises(CelCompileError, match=f"condition must be boolean, it returns {kind}") as info:
        compile_condition(env, expr)
    assert info.value.column is None


def test_error_without_position_keeps_first_line(env: Any) -> None:
    deep = "(" * 300 + "true" + ")" * 300
    with pytest.raises(CelCompileError, match="recursion limit") as info:
        compile_condition(env, deep)
    assert info.value.column is None


def test_error_without_any_text() -> None:
    class _Env:
        def compile(self, source: str) -> Any:
            raise RuntimeError("")

    with pytest.raises(CelCompileError, match="invalid expression"):
        compile_condition(_Env(), "x")
