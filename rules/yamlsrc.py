"""YAML text to plain data, remembering where every key came from.

Parsing uses PyYAML's *safe* composer only (no arbitrary object construction).
Each value's line is recorded under its path, so a validation error on
``("tools", "allow", "apply_credit", "rules", 0, "when")`` can be reported as
``policies/support-agent.yaml:27``. ``${VAR}`` / ``${VAR:-default}``
interpolation is optional and done here too, so a missing variable is reported
with its line like any other error.

Hostile input is bounded before anything is built (:class:`YamlLimits`): the
text's size, then, over PyYAML's event stream (an iterative parser, unlike its
recursive composer), the nesting depth, the number of aliases and the number of
nodes the document stands for once every alias is expanded. A 500-byte alias
bomb or ``[[[...600 levels...]]]`` is a located error, never a MemoryError or a
RecursionError; a recursive alias (``&a [*a]``) is refused the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import yaml

Path = tuple[str | int, ...]

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")
_TOKEN_RE = re.compile(r"__gpenv\d+__")
_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")
# libyaml's parser when PyYAML was built with it: ~10x faster than the pure-Python one, which matters for
# a file near the bounds. Both are safe loaders and emit the same events and nodes.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class YamlLimits:
    """Bounds on one YAML document, all checked before a single node is built.

    The defaults are far above any real policy or config file (the shipped ones are ~2 KB, depth 7, no
    aliases) and far below what hurts: 100,000 nodes build in well under a second.
    """

    max_bytes: int = 1024 * 1024  # UTF-8 bytes of text
    max_depth: int = 64  # nested mappings/sequences, the root counts as 1, aliases counted expanded
    max_aliases: int = 100
    max_nodes: int = 100_000  # scalars, mappings and sequences, keys included, aliases counted expanded


DEFAULT_LIMITS = YamlLimits()


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


def size_error(source: str, size: int, limits: YamlLimits = DEFAULT_LIMITS) -> SourceError | None:
    """The error for a file of ``size`` bytes, or None when it is within ``limits.max_bytes``.

    The shell calls this with the size on disk, so an oversized file is refused before it is read.
    """
    if size <= limits.max_bytes:
        return None
    mib = f" ({limits.max_bytes >> 20} MiB)" if limits.max_bytes % (1 << 20) == 0 else ""
    return SourceError(source, None, "", f"the file is {size} bytes; the limit is {limits.max_bytes}{mib}")


def load_yaml(
    text: str, source: str, *, env: Mapping[str, str] | None = None, limits: YamlLimits = DEFAULT_LIMITS
) -> Located:
    """Parse one YAML document safely; with ``env``, expand ``${VAR}`` inside string values.

    Raises :class:`YamlLoadError` (every error located) for invalid YAML, a document beyond ``limits``,
    an unsupported tag, a duplicate or non-scalar key, or a missing variable.
    """
    # Characters first: a huge text is refused without encoding it.
    too_big = size_error(source, len(text), limits)
    if too_big is None:
        too_big = size_error(source, len(text.encode("utf-8", "surrogatepass")), limits)
    if too_big is not None:
        raise YamlLoadError([too_big])
    tokens: dict[str, tuple[str, str | None, int]] = {}
    if env is not None:
        text, tokens = _placeholders(text)
    try:
        _check_bounds(text, source, limits)
        node = yaml.compose(text, Loader=_LOADER)
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


class _Open:
    """A mapping or sequence whose end event has not come yet."""

    __slots__ = ("anchor", "nodes", "height")

    def __init__(self, anchor: str | None) -> None:
        self.anchor = anchor
        self.nodes = 1  # itself, then everything inside it, aliases expanded
        self.height = 1  # levels of collections, itself included


def _check_bounds(text: str, source: str, limits: YamlLimits) -> None:
    """Walk the event stream once, in constant stack depth, and refuse a document beyond ``limits``.

    Each anchor's expanded size and height are known when its node ends, so an alias costs a dict
    lookup here, where building it would copy the whole subtree (the composer shares the node, our
    ``_build`` does not). Invalid YAML raises :class:`yaml.YAMLError` as composing would.
    """
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (expanded nodes, height)
    stack: list[_Open] = []
    total = aliases = 0

    def refuse(event: yaml.Event, message: str) -> NoReturn:
        mark = event.start_mark
        raise YamlLoadError([SourceError(source, mark.line + 1 if mark is not None else None, "", message)])

    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.CollectionStartEvent):
            if len(stack) >= limits.max_depth:
                refuse(event, f"nesting deeper than {limits.max_depth} levels")
            total += 1
            stack.append(_Open(event.anchor))
        elif isinstance(event, yaml.CollectionEndEvent):
            done = stack.pop()
            if done.anchor is not None:
                anchors[done.anchor] = (done.nodes, done.height)
            if stack:
                stack[-1].nodes += done.nodes
                stack[-1].height = max(stack[-1].height, done.height + 1)
        elif isinstance(event, yaml.ScalarEvent):
            total += 1
            if stack:
                stack[-1].nodes += 1
            if event.anchor is not None:
                anchors[event.anchor] = (1, 0)
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > limits.max_aliases:
                refuse(event, f"more than {limits.max_aliases} aliases")
            name = event.anchor
            if any(o.anchor == name for o in stack):
                refuse(event, f"alias *{name} refers to its own anchor (a recursive structure)")
            if name not in anchors:
                continue  # undefined: the composer reports it with its line
            nodes, height = anchors[name]
            if len(stack) + height > limits.max_depth:
                refuse(event, f"alias *{name} nests deeper than {limits.max_depth} levels when expanded")
            total += nodes
            if total > limits.max_nodes:
                refuse(event, f"the document expands to more than {limits.max_nodes} nodes through aliases "
                              f"(at alias *{name})")
            if stack:
                stack[-1].nodes += nodes
                stack[-1].height = max(stack[-1].height, height + 1)
            continue
        if total > limits.max_nodes:
            refuse(event, f"the document has more than {limits.max_nodes} nodes")


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
