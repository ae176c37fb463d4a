"""CEL conditions: compiled and type-checked once, evaluated in microseconds.

Uses ``cel-expr-python`` (the C++ CEL runtime). Variables a condition may use:

- ``args``      map  - a tool call's parsed arguments (tool rules)
- ``output``    map  - the parsed structured output (output rules)
- ``tool``      string - the tool's name
- ``model``     string - the model the client asked for
- ``principal`` map  - ``{"key": ..., "team": ..., "org": ...}``
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cel_expr_python import cel

_COLUMN = re.compile(r"<input>:(\d+):(\d+): (.*)")


class CelCompileError(ValueError):
    """A condition that does not parse or type-check; ``column`` is 1-based."""

    def __init__(self, message: str, column: int | None) -> None:
        super().__init__(message)
        self.column = column


class CelEvalError(RuntimeError):
    """A condition that failed at run time (missing key, bad conversion, ...)."""


def new_env() -> Any:
    """A CEL environment declaring the variables conditions may use."""
    dyn_map = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
    return cel.NewEnv(
        variables={
            "args": dyn_map,
            "output": dyn_map,
            "tool": cel.Type.STRING,
            "model": cel.Type.STRING,
            "principal": cel.Type.Map(cel.Type.STRING, cel.Type.STRING),
        }
    )


@dataclass(frozen=True)
class Condition:
    """A compiled boolean CEL expression."""

    source: str
    program: Any

    def holds(self, data: dict[str, Any]) -> bool:
        """Evaluate; raise :class:`CelEvalError` when the expression errors or is not a bool."""
        result = self.program.eval(data=data)
        kind = result.type()
        if kind == cel.Type.BOOL:
            return bool(result.value())
        if kind == cel.Type.ERROR:
            raise CelEvalError(str(result.value()))
        raise CelEvalError(f"condition returned {kind.name()}, not bool")


def compile_condition(env: Any, source: str) -> Condition:
    """Parse and type-check ``source``; a non-boolean static type is an error."""
    try:
        program = env.compile(source)
    except RuntimeError as exc:
        text = str(exc)
        m = _COLUMN.search(text)
        if m:
            raise CelCompileError(m.group(3).strip(), int(m.group(2))) from None
        # Errors without a position (e.g. the recursion limit): keep the first line only.
        raise CelCompileError((text.splitlines() or ["invalid expression"])[0], None) from None
    kind = program.return_type()
    if kind not in (cel.Type.BOOL, cel.Type.DYN):
        raise CelCompileError(f"condition must be boolean, it returns {kind.name()}", None)
    return Condition(source, program)
