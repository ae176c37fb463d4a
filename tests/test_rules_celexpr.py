"""rules.celexpr: CEL conditions compiled and type-checked once, with columns in errors."""

from __future__ import annotations

import math
from typing import Any

import pytest
from cel_expr_python import cel
from hypothesis import given, settings
from hypothesis import strategies as st

from rules.celexpr import (
    FINITE_DOUBLE,
    CelCompileError,
    CelEvalError,
    Condition,
    compile_condition,
    finite_doubles,
    new_env,
)


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


# --- run-time failures of every kind, non-finite numbers ---------------------------------------------------


def test_iteration_budget_is_cel_eval_error(env: Any) -> None:
    """The C++ runtime raises RuntimeError past its iteration budget; a rule sees the evaluation error."""
    c = compile_condition(env, "args.lines.exists(l, l > 50)")
    with pytest.raises(CelEvalError, match="Iteration budget exceeded"):
        c.holds(data(args={"lines": [0] * 20_001}))
    assert c.holds(data(args={"lines": [0] * 100 + [51]})) is True


NON_FINITE = ["NaN", "nan", "-nan", "+nan", "NAN", "nan(123)", "Infinity", "-Infinity", "inf", "-inf", "INF",
              "1e999", "-1e999", "9" * 400]


@pytest.mark.parametrize("text", NON_FINITE)
def test_non_finite_conversion_is_an_evaluation_error(env: Any, text: str) -> None:
    for expr in ("double(args.a) > 50.0", "double(args.a) < 50.0", "!(double(args.a) <= 50.0)",
                 "int(args.a) > 50", "uint(args.a) > 50u"):
        with pytest.raises(CelEvalError):
            compile_condition(env, expr).holds(data(args={"a": text}))
    with pytest.raises(CelEvalError, match="not finite"):
        compile_condition(env, "double(args.a) > 50.0").holds(data(args={"a": text}))


def test_only_a_conversion_to_double_errors(env: Any) -> None:
    """A customer named "Nan" is a string like any other; numbers and numeric strings convert as before."""
    assert compile_condition(env, "args.name == 'Nan' && size(args.name) == 3").holds(data(args={"name": "Nan"}))
    over = compile_condition(env, "double(args.amount) > 50.0")
    for amount, want in (("51", True), ("50", False), (" 75.5 ", True), ("0x40", True), (51, True), (50.5, True),
                         (7, False)):
        assert over.holds(data(args={"amount": amount})) is want, amount
    assert compile_condition(env, "double(3u) == 3.0 && double(2) == 2.0 && type(1.0) == double").holds(data())
    with pytest.raises(CelEvalError, match=r"cannot convert string to double"):
        over.holds(data(args={"amount": "1_000"}))
    with pytest.raises(CelEvalError, match=r"double\(bool\)") as info:
        over.holds(data(args={"amount": True}))
    assert FINITE_DOUBLE not in str(info.value)
    with pytest.raises(CelEvalError, match="not finite"):  # an infinite double from arithmetic, converted
        compile_condition(env, "double(double(args.a) * 1e300) > 1.0").holds(data(args={"a": 1e10}))


@given(st.one_of(st.text(alphabet="0123456789+-.eExXpP _\tinfatyINFATY", max_size=24),
                 st.from_regex(r"\A[ ]?[+-]?[0-9]{0,6}(\.[0-9]{0,6})?([eE][+-]?[0-9]{1,4})?[ ]?\Z")))
@settings(max_examples=300, deadline=None, database=None)
def test_finite_double_converts_exactly_like_the_standard_double(text: str) -> None:
    """Property: where the standard ``double()`` gives a finite value ours gives the same; else it errors."""
    env = new_env()
    standard = cel.NewEnv(variables={"s": cel.Type.STRING}).compile("double(s)").eval(data={"s": text})
    ours = compile_condition(env, "double(args.a) == args.b")
    if standard.type() == cel.Type.DOUBLE and math.isfinite(standard.value()):
        assert ours.holds(data(args={"a": text, "b": standard.value()})) is True
    else:
        with pytest.raises(CelEvalError):
            ours.holds(data(args={"a": text, "b": 0.0}))


REWRITES = [
    ("double(x)", "gp_dbl(x)"),
    ("double (x) + .double(y) + a.double(z)", "gp_dbl (x) + .gp_dbl(y) + a.gp_dbl(z)"),
    ("double// why\n(x)", "gp_dbl// why\n(x)"),
    ("'double(' + \"double(\" + r'double(\\' + b\"double(\"", "'double(' + \"double(\" + r'double(\\' + b\"double(\""),
    ("'''double(\n''' + R\"\"\"double(\"\"\" + 'it\\'s double(' + double(x)",
     "'''double(\n''' + R\"\"\"double(\"\"\" + 'it\\'s double(' + gp_dbl(x)"),
    ("// double(x)\ndouble(y)", "// double(x)\ngp_dbl(y)"),
    ("type(x) == double && doubled(x) && my_double(x) && double2(x)",
     "type(x) == double && doubled(x) && my_double(x) && double2(x)"),
]


def test_only_calls_of_double_are_rewritten_and_errors_keep_the_authors_text(env: Any) -> None:
    for source, expected in REWRITES:
        assert finite_doubles(source) == expected, source
        assert len(finite_doubles(source)) == len(source)  # the columns stay the author's
    with pytest.raises(CelCompileError) as info:
        compile_condition(env, "double(args.a) == 'x'")
    assert info.value.column == 16 and "'(double, string)'" in str(info.value)
    with pytest.raises(CelCompileError) as info:
        compile_condition(env, "tool == 'double(' && double(true, 1) > 1.0")
    assert info.value.column == 28 and "double" in str(info.value) and FINITE_DOUBLE not in str(info.value)
