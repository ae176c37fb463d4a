"""YAML text to plain data, remembering where every key came from.

Parsing uses PyYAML's *safe* composer only (no arbitrary object construction).
Each value's line is recorded under its path, so a validation error on
``("tools", "allow", "apply_credit", "rules", 0, "when")`` can be reported as
``policies/support-agent.yaml:27``. ``${VAR}`` / ``${VAR:-default}``
interpolation is optional and done here too, so a missing variable is reported
with its line like any other error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")
_TOKEN_RE = re.compile(r"__gpenv\d+__")
_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


@dataclass(frozen=True)
class SourceError:
    """One problem found while loading, with its location."""

    source: str
    line: int | None
    path: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        key = f" [{self.path}]" if self.path else ""
        return f"{where}:{key} {self.message}" if self.severity == "error" else (
            f"{where}:{key} warning: {self.message}"
        )


@dataclass
class Located:
    """A parsed YAML document and the line of each path in it."""

    source: str
    data: Any
    lines: dict[Path, int] = field(default_factory=dict)

    def line_of(self, path: Path) -> int | None:
        """The line of ``path`` or of its nearest recorded ancestor."""
        p = tuple(path)
        while True:
            if p in self.lines:
                return self.lines[p]
            if not p:
                return None
            p = p[:-1]


def format_path(path: Path) -> str:
    """``("a", 0, "b")`` -> ``a[0].b``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class YamlLoadError(ValueError):
    """The text is not valid YAML (or an interpolation failed).

    ``located`` is the parsed document when the YAML itself parsed (a missing variable or a
    duplicate key), so a caller can still validate it and report every error in one run.
    """

    def __init__(self, errors: list[SourceError], located: Located | None = None) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors
        self.located = located


def _placeholders(text: str) -> tuple[str, dict[str, tuple[str, str | None, int]]]:
    """Replace each ``${...}`` by a YAML-neutral token before parsing.

    Expanding after parsing keeps a value from changing the YAML structure (a key
    containing ``#`` or ``: ``), and tokens let ``[${VAR}]`` parse in flow context.
    """
    found: dict[str, tuple[str, str | None, int]] = {}

    def repl(m: re.Match[str]) -> str:
        token = f"__gpenv{len(found)}__"
        found[token] = (m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
        return token

    return _ENV_RE.sub(repl, text), found


def load_yaml(text: str, source: str, *, env: Mapping[str, str] | None = None) -> Located:
    """Parse one YAML document safely; with ``env``, expand ``${VAR}`` inside string values."""
    tokens: dict[str, tuple[str, str | None, int]] = {}
    if env is not None:
        text, tokens = _placeholders(text)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise YamlLoadError([SourceError(source, line, "", f"invalid YAML: {problem}")]) from None
    located = Located(source, None)
    errors: list[SourceError] = []
    constructor = yaml.SafeLoader("")
    if node is not None:
        located.data = _build(node, (), located, constructor, env, errors, tokens)
    if errors:
        raise YamlLoadError(errors, located)
    return located


def _build(
    node: yaml.Node,
    path: Path,
    located: Located,
    constructor: yaml.SafeLoader,
    env: Mapping[str, str] | None,
    errors: list[SourceError],
    tokens: dict[str, tuple[str, str | None, int]],
) -> Any:
    line = node.start_mark.line + 1
    located.lines[path] = line
    if isinstance(node, yaml.CollectionNode) and node.tag not in _PLAIN_TAGS:
        # Collections are built as plain data below; a tag asking for more (``!!python/object``) is refused.
        errors.append(SourceError(located.source, line, format_path(path), f"unsupported tag {node.tag}"))
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _construct(key_node, path, located.source, constructor, errors)
            if isinstance(key, list | dict | set):
                # ``[a, b]: 1`` or ``{a: 1}: 2`` would crash the dict below; report it like any other error.
                errors.append(SourceError(located.source, key_node.start_mark.line + 1, format_path(path),
                                          "mapping keys must be scalars"))
                continue
            if key in out:
                errors.append(
                    SourceError(located.source, key_node.start_mark.line + 1, format_path((*path, key)),
                                "duplicate key")
                )
            child = (*path, key)
            out[key] = _build(value_node, child, located, constructor, env, errors, tokens)
            located.lines[child] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _build(item, (*path, i), located, constructor, env, errors, tokens)
            for i, item in enumerate(node.value)
        ]
    value = _construct(node, path, located.source, constructor, errors)
    if env is not None and tokens and isinstance(node, yaml.ScalarNode) and "__gpenv" in node.value:
        value = _TOKEN_RE.sub(
            # A token-like text the user wrote literally (not one of ours) is left as written.
            lambda m: _expand(tokens[m.group(0)], env, located.source, path, errors)
            if m.group(0) in tokens else m.group(0),
            node.value,
        )
    return value


def _construct(
    node: yaml.Node, path: Path, source: str, constructor: yaml.SafeLoader, errors: list[SourceError]
) -> Any:
    """The Python value of a node; a tag the safe loader cannot build (``!!python/...``, ``!!int x``) is
    a located error, not a crash (PyYAML raises assorted exception types for these)."""
    try:
        return constructor.construct_object(node, deep=True)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        errors.append(SourceError(source, node.start_mark.line + 1, format_path(path), f"invalid value: {first}"))
        return None


def _expand(
    spec: tuple[str, str | None, int], env: Mapping[str, str], source: str, path: Path, errors: list[SourceError]
) -> str:
    name, default, line = spec
    if name in env:
        return env[name]
    if default is not None:
        return default
    errors.append(SourceError(source, line, format_path(path), f"environment variable {name} is not set"))
    return ""


def pydantic_errors(exc: Any, located: Located) -> list[SourceError]:
    """Turn a pydantic ``ValidationError`` into located errors."""
    out = []
    for err in exc.errors():
        loc = tuple(p for p in err.get("loc", ()) if isinstance(p, str | int))
        real: list[str | int] = []
        node: Any = located.data
        for part in loc:
            # Union tags are not in the data, nor is a missing field's key (reported at its parent).
            if not _has_child(node, part):
                continue
            real.append(part)
            node = node[part]
        msg = str(err.get("msg", "invalid value"))
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        out.append(SourceError(located.source, located.line_of(tuple(real)), format_path(tuple(real)), msg))
    return out


def _has_child(node: Any, part: str | int) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
