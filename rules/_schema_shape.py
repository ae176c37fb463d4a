"""Measuring a JSON schema before compiling it: what compiling and validating it can cost.

``rules.schemas`` compiles with ``jsonschema_rs``, which holds the GIL while it works, so the cost of an
untrusted schema must be bounded before it is compiled. Everything here reads the schema's canonical JSON:
byte counts first, a walk over the parsed schema only when it has references or ``patternProperties``
(and never over more than :attr:`SchemaLimits.max_bytes`, which is checked first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson

__all__ = ["MAX_PATTERNS", "REGEX_ALONE", "REGEX_SCHEMA", "SchemaLimits", "Shape", "measure", "over_limits",
           "too_large"]

# Compiled-size caps of the regex engine (bytes of its automata). Building one takes ~8 ns a byte, and
# refusing one that outgrows its cap takes as long as building up to the cap, so these bound the time.
REGEX_ALONE = 256 * 1024  # one pattern: \p{L}{5} fits, the \p{L}{200} of a hostile request does not
REGEX_SCHEMA = 1024 * 1024  # shared by the patterns of one schema
_REGEX_FLOOR = 16 * 1024  # what each pattern keeps at worst: enough for dates, ids, e-mails
MAX_PATTERNS = REGEX_SCHEMA // _REGEX_FLOOR  # per untrusted schema: 64
_ORJSON_DEPTH = 1024  # orjson's fixed nesting limit, used to test a depth at C speed
_DATA = frozenset({"const", "enum", "default", "examples"})  # values here are data, never subschemas
_DYNAMIC = frozenset({"$dynamicRef", "$recursiveRef"})  # resolved at validation time: not measurable
_REF_MARKERS = (b'"$ref":', b'"$dynamicRef":', b'"$recursiveRef":')


@dataclass(frozen=True)
class SchemaLimits:
    """Caps on an untrusted schema, checked before compiling it.

    ``max_bytes`` bounds its canonical JSON and, counted in JSON values, its size
    once local ``$ref`` are expanded; ``max_depth`` bounds its nesting (objects
    and arrays). At most :data:`MAX_PATTERNS` patterns, and only local
    references (``#``, ``#/...``) without embedded ``$id`` resources, which are
    the ones whose expansion can be measured.
    """

    max_bytes: int = 65536
    max_depth: int = 32

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or not 1 <= self.max_depth < _ORJSON_DEPTH:
            raise ValueError("max_bytes must be positive and max_depth between 1 and 1023")


@dataclass(frozen=True)
class Shape:
    """What compiling and validating a schema can cost, read from its canonical JSON."""

    patterns: int
    expanded: int | None  # JSON values once local $refs are expanded (None: no references)
    cyclic: bool  # a reference leads back to a schema that contains it (recursion)
    problem: str | None  # why the references cannot be measured

    def regex_limit(self) -> int:
        """The compiled-size cap each of the schema's patterns gets (a share of the schema's budget)."""
        share = REGEX_SCHEMA // self.patterns if self.patterns else REGEX_ALONE
        return max(_REGEX_FLOOR, min(REGEX_ALONE, share))

    def report_weight(self, text: bytes) -> int | None:
        """Values of the schema a violation report may visit per instance value; None when unbounded."""
        if self.cyclic or self.problem is not None:
            return None
        if self.expanded is not None:
            return self.expanded
        return text.count(b",") + text.count(b":") + text.count(b"[") + 1


class _Scan:
    """One schema subtree: its values, the references in it, its patterns."""

    __slots__ = ("patterns", "problem", "refs", "values")

    def __init__(self, node: Any, *, root: bool) -> None:
        # One pass over every member, type() rather than isinstance (the tree is orjson's plain dicts and
        # lists): this walk is the cost of measuring, so it is kept tight.
        values, patterns = 1, 0
        refs: list[str] = []
        problem: str | None = None
        stack = [node]
        push = stack.append
        while stack:
            cur = stack.pop()
            values += len(cur)
            if type(cur) is list:
                for v in cur:
                    if type(v) is dict or type(v) is list:
                        push(v)
                continue
            for k, v in cur.items():
                kind = type(v)
                if kind is str:
                    if k == "pattern":
                        patterns += 1
                    elif k == "$ref":
                        refs.append(v)
                    elif k in _DYNAMIC:
                        problem = f"only local references ('#' or '#/...') are allowed, not {k}"
                    elif k == "$id" and root and cur is not node and problem is None:
                        problem = "embedded resources ($id below the root) are not allowed with $ref"
                elif (kind is dict or kind is list) and k not in _DATA:
                    if k == "patternProperties" and kind is dict:
                        patterns += len(v)
                    push(v)
        self.values, self.patterns, self.refs, self.problem = values, patterns, refs, problem


def _resolve(root: Any, ref: str) -> Any:
    """The subschema a local reference points to, or None when it points nowhere (compiling reports it)."""
    node = root
    for raw in ref[2:].split("/") if ref != "#" else ():
        part = (unquote(raw) if "%" in raw else raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node if isinstance(node, dict | list) else None


def _expand(root: Any, first: _Scan) -> tuple[int, bool, str | None]:
    """(values once references are expanded, whether they recurse, why they cannot be measured).

    Each referenced subschema is scanned once and its expansion memoized; a
    reference back into the chain being expanded is recursion, which the
    validator memoizes and the instance's depth bounds, so it adds nothing.
    """
    memo: dict[int, int] = {}
    scans: dict[int, _Scan] = {id(root): first}
    active = {id(root)}
    cyclic = False
    frames: list[tuple[int, list[int], Any]] = [(id(root), [first.values], iter(first.refs))]
    while frames:
        key, total, refs = frames[-1]
        ref = next(refs, None)
        if ref is None:
            frames.pop()
            active.discard(key)
            memo[key] = total[0]
            if frames:
                frames[-1][1][0] += total[0]
            continue
        if ref != "#" and not ref.startswith("#/"):
            return 0, cyclic, f"only local references ('#' or '#/...') are allowed, not {repr(ref)[:80]}"
        target = _resolve(root, ref)
        if target is None:
            continue
        tid = id(target)
        if tid in memo:
            total[0] += memo[tid]
        elif tid in active:
            cyclic = True
        else:
            scan = scans.setdefault(tid, _Scan(target, root=False))
            active.add(tid)
            frames.append((tid, [scan.values], iter(scan.refs)))
    return memo[id(root)], cyclic, first.problem


def measure(text: bytes) -> Shape:
    """The shape of the schema whose canonical JSON is ``text``."""
    has_refs = any(marker in text for marker in _REF_MARKERS)
    if not has_refs and b'"patternProperties":' not in text:
        # No walk needed: count "pattern" keys (data and property names too: an upper bound).
        return Shape(text.count(b'"pattern":'), None, False, None)
    tree = orjson.loads(text)  # plain dicts and lists, whatever Mapping the caller passed
    scan = _Scan(tree, root=True)
    if not has_refs:
        return Shape(scan.patterns, None, False, None)
    expanded, cyclic, problem = _expand(tree, scan)
    return Shape(scan.patterns, expanded, cyclic, problem)


def too_large(text: bytes, limits: SchemaLimits) -> str | None:
    """Why ``text`` is too large for ``limits``, or None: checked before anything else, even measuring."""
    if len(text) > limits.max_bytes:
        return f"the schema is {len(text)} bytes; at most {limits.max_bytes} are allowed"
    return None


def over_limits(text: bytes, shape: Shape, limits: SchemaLimits) -> str | None:
    """Why ``text`` (within :func:`too_large`) is over the other ``limits``, or None. Cheapest checks first."""
    if text.count(b"{") + text.count(b"[") > limits.max_depth:  # else it cannot nest that deep
        pad = _ORJSON_DEPTH - limits.max_depth
        try:
            # Inside `pad` arrays, orjson's own limit is reached exactly when the schema nests deeper than
            # max_depth: the depth test runs at parser speed, with no Python walk.
            orjson.loads(b"[" * pad + text + b"]" * pad)
        except orjson.JSONDecodeError:
            return f"the schema nests more than {limits.max_depth} levels deep"
    if shape.patterns > MAX_PATTERNS:
        return (f"the schema has {shape.patterns} regular expressions (pattern, patternProperties);"
                f" at most {MAX_PATTERNS} are allowed")
    if shape.problem is not None:
        return shape.problem
    if shape.expanded is not None and shape.expanded > limits.max_bytes:
        return f"the schema expands to {shape.expanded} values through $ref; at most {limits.max_bytes} are allowed"
    return None
