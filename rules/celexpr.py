"""CEL conditions: compiled and type-checked once, evaluated in microseconds.

Uses ``cel-expr-python`` (the C++ CEL runtime). Variables a condition may use:

- ``args``      map  - a tool call's parsed arguments (tool rules)
- ``output``    map  - the parsed structured output (output rules)
- ``tool``      string - the tool's name
- ``model``     string - the model the client asked for
- ``principal`` map  - ``{"key": ..., "team": ..., "org": ...}``

Non-finite numbers: the standard ``double()`` turns ``"NaN"``, ``"inf"`` or ``"1e999"`` into a double
that compares false with everything (NaN) or larger than any limit (infinity), so a string amount of
``"NaN"`` would pass ``double(args.amount) > 50.0``. The C++ runtime will not let an overload of
``double`` be replaced, so every call of ``double(...)`` is compiled as a call of our own
:data:`FINITE_DOUBLE`, which converts exactly like the standard function (it runs it) and makes a
non-finite result an evaluation error, which the rule's ``on_error`` then decides. ``int()`` and
``uint()`` need nothing: they already refuse ``"NaN"``, ``"inf"`` and out-of-range values.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from cel_expr_python import cel

_COLUMN = re.compile(r"<input>:(\d+):(\d+): (.*)")

# As long as "double", so the columns the checker reports for the rewritten text are the author's.
FINITE_DOUBLE = "gp_dbl"
# One CEL lexeme at a time: string and bytes literals (raw or not, single or triple quoted) and
# comments are skipped whole, so a ``double(`` inside them is never rewritten.
_LEXEME = re.compile(
    r"""(?:[rR][bB]?|[bB][rR])(?:'''.*?'''|\"\"\".*?\"\"\"|'[^'\n]*'|"[^"\n]*")"""
    r"""|[bB]?(?:'''(?:\\.|[^\\])*?'''|\"\"\"(?:\\.|[^\\])*?\"\"\"|'(?:\\.|[^\\'\n])*'|"(?:\\.|[^\\"\n])*")"""
    r"""|//[^\n]*|(?P<word>[A-Za-z0-9_]+)|.""",
    re.S,
)
_CALL_FOLLOWS = re.compile(r"(?:\s|//[^\n]*)*\(")


class CelCompileError(ValueError):
    """A condition that does not parse or type-check; ``column`` is 1-based."""

    def __init__(self, message: str, column: int | None) -> None:
        super().__init__(message)
        self.column = column


class CelEvalError(RuntimeError):
    """A condition that failed at run time (missing key, bad conversion, iteration budget, ...)."""


def _finite(value: float) -> float:
    if not math.isfinite(value):
        # The value itself is not repeated: errors reach the audit line, arguments must not.
        raise ValueError("double() result is not finite (NaN or infinity)")
    return value


def _finite_double_decl() -> Any:
    """``gp_dbl``: the standard ``double()`` overloads, refusing non-finite results."""
    to_double = cel.NewEnv(variables={"s": cel.Type.STRING}).compile("double(s)")

    def from_string(text: str) -> float:
        result = to_double.eval(data={"s": text})
        if result.type() == cel.Type.ERROR:
            raise ValueError("cannot convert string to double")
        return _finite(float(result.value()))

    def from_number(value: float) -> float:
        return _finite(float(value))

    t = cel.Type
    return cel.FunctionDecl(FINITE_DOUBLE, [
        cel.Overload(f"{FINITE_DOUBLE}_string", t.DOUBLE, [t.STRING], impl=from_string),
        cel.Overload(f"{FINITE_DOUBLE}_int", t.DOUBLE, [t.INT], impl=from_number),
        cel.Overload(f"{FINITE_DOUBLE}_uint", t.DOUBLE, [t.UINT], impl=from_number),
        cel.Overload(f"{FINITE_DOUBLE}_double", t.DOUBLE, [t.DOUBLE], impl=from_number),
    ])


def new_env() -> Any:
    """A CEL environment declaring the variables conditions may use (and :data:`FINITE_DOUBLE`)."""
    dyn_map = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
    return cel.NewEnv(
        variables={
            "args": dyn_map,
            "output": dyn_map,
            "tool": cel.Type.STRING,
            "model": cel.Type.STRING,
            "principal": cel.Type.Map(cel.Type.STRING, cel.Type.STRING),
        },
        functions=[_finite_double_decl()],
    )


def finite_doubles(source: str) -> str:
    """``source`` with every call of ``double(...)`` made a call of :data:`FINITE_DOUBLE` (same length)."""
    out: list[str] = []
    for m in _LEXEME.finditer(source):
        text = m.group(0)
        if m.group("word") == "double" and _CALL_FOLLOWS.match(source, m.end()):
            text = FINITE_DOUBLE
        out.append(text)
    return "".join(out)


def _readable(message: str) -> str:
    return message.replace(FINITE_DOUBLE, "double")


@dataclass(frozen=True)
class Condition:
    """A compiled boolean CEL expression."""

    source: str
    program: Any

    def holds(self, data: dict[str, Any]) -> bool:
        """Evaluate; raise :class:`CelEvalError` when the expression errors or is not a bool."""
        try:
            result = self.program.eval(data=data)
            kind = result.type()
            value = result.value()
        except Exception as exc:  # the runtime raises (e.g. its iteration budget) instead of returning an error
            raise CelEvalError(_readable(str(exc)) or type(exc).__name__) from None
        if kind == cel.Type.BOOL:
            return bool(value)
        if kind == cel.Type.ERROR:
            raise CelEvalError(_readable(str(value)))
        raise CelEvalError(f"condition returned {kind.name()}, not bool")


def compile_condition(env: Any, source: str) -> Condition:
    """Parse and type-check ``source``; a non-boolean static type is an error."""
    try:
        program = env.compile(finite_doubles(source))
    except RuntimeError as exc:
        text = _readable(str(exc))
        m = _COLUMN.search(text)
        if m:
            raise CelCompileError(m.group(3).strip(), int(m.group(2))) from None
        # Errors without a position (e.g. the recursion limit): keep the first line only.
        raise CelCompileError((text.splitlines() or ["invalid expression"])[0], None) from None
    kind = program.return_type()
    if kind not in (cel.Type.BOOL, cel.Type.DYN):
        raise CelCompileError(f"condition must be boolean, it returns {kind.name()}", None)
    return Condition(source, program)
