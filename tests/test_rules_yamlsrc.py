"""rules.yamlsrc: safe YAML parsing with line numbers, ``${VAR}`` interpolation, pydantic error mapping."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from rules.yamlsrc import Located, SourceError, YamlLoadError, format_path, load_yaml, pydantic_errors


def _errors(text: str, env: dict[str, str] | None = None) -> list[SourceError]:
    with pytest.raises(YamlLoadError) as info:
        load_yaml(text, "f.yaml", env=env)
    return info.value.errors


def test_lines_are_recorded_per_path() -> None:
    loc = load_yaml("a:\n  b:\n    - x\n    - c: 1\n", "f.yaml")
    assert loc.data == {"a": {"b": ["x", {"c": 1}]}}
    assert loc.line_of(("a",)) == 1
    assert loc.line_of(("a", "b")) == 2
    assert loc.line_of(("a", "b", 0)) == 3
    assert loc.line_of(("a", "b", 1, "c")) == 4
    # An unknown path falls back to its nearest recorded ancestor.
    assert loc.line_of(("a", "b", 1, "zzz", 3)) == 4
    assert loc.line_of(("nope",)) == 1


def test_empty_document_has_no_data_and_no_lines() -> None:
    loc = load_yaml("", "f.yaml")
    assert loc.data is None
    assert loc.line_of(("a",)) is None


def test_invalid_yaml_is_reported_with_line() -> None:
    (err,) = _errors("a: 1\nb: [1, 2\nc: 3\n")
    assert err.source == "f.yaml"
    assert err.line is not None and err.line >= 2
    assert err.message.startswith("invalid YAML:")


def test_invalid_character_without_mark_has_no_line() -> None:
    (err,) = _errors("a: \x07\n")
    assert err.line is None
    assert "invalid YAML" in err.message
    assert str(err).startswith("f.yaml: ")


def test_several_documents_are_refused() -> None:
    (err,) = _errors("a: 1\n---\nb: 2\n")
    assert "invalid YAML" in err.message


def test_duplicate_keys_are_errors_with_line() -> None:
    errs = _errors("a: 1\nb:\n  c: 1\n  c: 2\n")
    assert [(e.line, e.path, e.message) for e in errs] == [(4, "b.c", "duplicate key")]


def test_non_scalar_keys_are_errors_not_crashes() -> None:
    errs = _errors("top:\n  [a, b]: 1\n  ok: 2\n")
    assert [(e.line, e.path, e.message) for e in errs] == [(2, "top", "mapping keys must be scalars")]


def test_python_tags_are_refused_with_line() -> None:
    (err,) = _errors("x: 1\na: !!python/object/apply:os.system ['true']\n")
    assert (err.line, err.path) == (2, "a")
    assert err.message == "unsupported tag tag:yaml.org,2002:python/object/apply:os.system"
    (err,) = _errors("a: !!python/name:os.system ''\n")
    assert (err.line, err.path) == (1, "a")
    assert err.message.startswith("invalid value: could not determine a constructor")


def test_bad_tagged_scalars_are_errors_not_crashes() -> None:
    errs = _errors("a: !!int abc\nb: !!timestamp zz\n!custom k: 1\n")
    assert [(e.line, e.path) for e in errs] == [(1, "a"), (2, "b"), (3, "")]
    assert all(e.message.startswith("invalid value: ") for e in errs)


def test_errors_carry_the_located_document_when_yaml_parsed() -> None:
    with pytest.raises(YamlLoadError) as info:
        load_yaml("a: 1\na: 2\n", "f.yaml")
    assert info.value.located is not None and info.value.located.data == {"a": 2}


def test_env_plain_and_default() -> None:
    env = {"A": "alpha"}
    loc = load_yaml("x: ${A}\ny: ${B:-dflt}\nz: pre-${A}-${B:-}-post\nw: ${A:-unused}\n", "f.yaml", env=env)
    assert loc.data == {"x": "alpha", "y": "dflt", "z": "pre-alpha--post", "w": "alpha"}


def test_env_missing_variable_is_error_with_line() -> None:
    errs = _errors("a: 1\nb:\n  c: ${NOPE}\n", env={})
    assert [(e.line, e.path, e.message) for e in errs] == [(3, "b.c", "environment variable NOPE is not set")]
    assert str(errs[0]) == "f.yaml:3: [b.c] environment variable NOPE is not set"


def test_env_in_flow_sequence() -> None:
    loc = load_yaml("keys: [${A}, ${B:-b}]\n", "f.yaml", env={"A": "a1"})
    assert loc.data == {"keys": ["a1", "b"]}


def test_env_values_with_yaml_syntax_stay_values() -> None:
    env = {"H": "x # not a comment", "C": "k: v", "L": "[1, 2]"}
    loc = load_yaml("h: ${H}\nc: ${C}\nl: ${L}\n", "f.yaml", env=env)
    assert loc.data == {"h": "x # not a comment", "c": "k: v", "l": "[1, 2]"}


def test_env_not_expanded_without_env_mapping() -> None:
    loc = load_yaml("a: ${A}\n", "f.yaml")
    assert loc.data == {"a": "${A}"}


def test_env_scalars_without_placeholders_keep_their_type() -> None:
    loc = load_yaml("n: 3\ns: ${A}\nb: true\n", "f.yaml", env={"A": "1"})
    assert loc.data == {"n": 3, "s": "1", "b": True}


def test_env_token_lookalike_written_literally_is_kept() -> None:
    loc = load_yaml("a: __gpenv7__ and ${A}\n", "f.yaml", env={"A": "v"})
    assert loc.data == {"a": "__gpenv7__ and v"}


def test_env_with_no_placeholders_at_all() -> None:
    assert load_yaml("a: __gpenv0__\n", "f.yaml", env={}).data == {"a": "__gpenv0__"}


def test_env_placeholder_in_comment_is_ignored() -> None:
    assert load_yaml("a: 1  # ${UNSET}\n", "f.yaml", env={}).data == {"a": 1}


def test_format_path() -> None:
    assert format_path(()) == ""
    assert format_path(("a", 0, "b")) == "a[0].b"
    assert format_path((0, "b")) == "[0].b"


def test_source_error_str_variants() -> None:
    assert str(SourceError("f", 3, "a.b", "bad")) == "f:3: [a.b] bad"
    assert str(SourceError("f", None, "", "bad")) == "f: bad"
    assert str(SourceError("f", 3, "a", "loose", "warning")) == "f:3: [a] warning: loose"


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int


class _Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[_Inner]
    name: str


def _pyd(text: str) -> list[SourceError]:
    loc = load_yaml(text, "m.yaml")
    with pytest.raises(ValidationError) as info:
        _Outer.model_validate(loc.data)
    return pydantic_errors(info.value, loc)


def test_pydantic_errors_unknown_field_has_line() -> None:
    errs = _pyd("name: x\nitems:\n  - n: 1\n  - n: 2\n    extra: 3\n")
    assert [(e.line, e.path, e.message) for e in errs] == [(5, "items[1].extra", "unknown field")]


def test_pydantic_errors_bad_type_has_line() -> None:
    errs = _pyd("name: x\nitems:\n  - n: one\n")
    assert [(e.line, e.path) for e in errs] == [(3, "items[0].n")]
    assert "integer" in errs[0].message


def test_pydantic_errors_missing_field_is_reported_at_parent() -> None:
    errs = _pyd("items:\n  - {}\n")
    assert sorted((e.line, e.path) for e in errs) == [(1, ""), (2, "items[0]")]
    assert all(e.message == "Field required" for e in errs)


def test_pydantic_errors_union_segments_are_skipped() -> None:
    class _U(BaseModel):
        v: int | list[int]

    loc = Located("u.yaml", {"v": "x"}, {(): 1, ("v",): 2})
    with pytest.raises(ValidationError) as info:
        _U.model_validate(loc.data)
    errs = pydantic_errors(info.value, loc)
    # loc is ("v", "int") and ("v", "list[int]"): the tags are not keys of the data.
    assert {(e.line, e.path) for e in errs} == {(2, "v")}


# --- bounds: checked on the event stream, before any node is built (hostile files, round 2 item 8) ----------


def alias_bomb(levels: int, fan: int = 10) -> str:
    """``levels`` anchored lists, each holding ``fan`` aliases of the one above: fan**levels leaves."""
    lines = ["l0: &l0 [" + ", ".join(["x"] * fan) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fan) + "]")
    return "\n".join(lines) + "\n"


def nested(depth: int) -> str:
    return "top: " + "[" * (depth - 1) + "]" * (depth - 1) + "\n"


def test_alias_bomb_is_refused_before_expansion() -> None:
    # 10**6 leaves: cheap to refuse, ~1 GB of lists if expanded (the 560-byte, 10**8 bomb is in test_cli_check).
    text = alias_bomb(6)
    (err,) = _errors(text)
    # l3 stands for 11,111 nodes: the 8th alias of it (line 5) takes the document past 100,000.
    assert (err.source, err.line, err.path) == ("f.yaml", 5, "")
    assert err.message == "the document expands to more than 100000 nodes through aliases (at alias *l3)"


def test_recursive_alias_is_refused_with_line() -> None:
    (err,) = _errors("a: 1\nb: &loop\n  - x\n  - *loop\n")
    assert (err.line, err.message) == (4, "alias *loop refers to its own anchor (a recursive structure)")
    (err,) = _errors("m: &m {k: *m}\n")
    assert (err.line, err.message) == (1, "alias *m refers to its own anchor (a recursive structure)")


def test_nesting_depth_is_bounded_with_line() -> None:
    assert load_yaml(nested(64), "f.yaml").data is not None  # the root mapping is level 1
    (err,) = _errors("ok: 1\n" + nested(65))
    assert (err.line, err.message) == (2, "nesting deeper than 64 levels")
    (err,) = _errors(nested(600))  # the composer itself would raise RecursionError here
    assert (err.line, err.message) == (1, "nesting deeper than 64 levels")
    deep_block = "".join("  " * i + f"k{i}:\n" for i in range(70)) + "  " * 70 + "v: 1\n"
    (err,) = _errors(deep_block)
    assert (err.line, err.message) == (65, "nesting deeper than 64 levels")  # mapping n starts on line n


def test_alias_expanding_below_the_depth_limit_is_refused() -> None:
    # Each anchor is 40 levels deep in the text; reusing it 40 levels down makes 80 once expanded.
    inner = "[" * 40 + "]" * 40
    text = f"a: &deep {inner}\nb: " + "[" * 39 + "*deep" + "]" * 39 + "\n"
    (err,) = _errors(text)
    assert (err.line, err.message) == (2, "alias *deep nests deeper than 64 levels when expanded")


def test_alias_count_is_bounded() -> None:
    ok = "a: &a 1\nb: [" + ", ".join(["*a"] * 100) + "]\n"
    assert load_yaml(ok, "f.yaml").data["b"] == [1] * 100
    too_many = "a: &a 1\nb: [" + ", ".join(["*a"] * 100) + "]\nc: *a\n"
    (err,) = _errors(too_many)
    assert (err.line, err.message) == (3, "more than 100 aliases")


def test_node_count_is_bounded_without_aliases() -> None:
    text = "a: [" + ",".join(["1"] * 60_000) + "]\nb: [" + ",".join(["2"] * 60_000) + "]\n"
    (err,) = _errors(text)
    assert (err.line, err.message) == (2, "the document has more than 100000 nodes")


def test_file_size_is_bounded() -> None:
    text = "a: '" + "x" * (1024 * 1024) + "'\n"
    (err,) = _errors(text)
    assert (err.line, err.path) == (None, "")
    assert err.message == f"the file is {len(text)} bytes; the limit is 1048576 (1 MiB)"
    # Counted in UTF-8 bytes, not characters.
    (err,) = _errors("a: '" + "é" * 600_000 + "'\n")
    assert "the limit is 1048576" in err.message


def test_bounds_apply_with_env_expansion_too() -> None:
    (err,) = _errors(alias_bomb(6), env={})
    assert err.line == 5 and "more than 100000 nodes" in err.message


def test_limits_can_be_tightened_per_call() -> None:
    from rules.yamlsrc import YamlLimits

    with pytest.raises(YamlLoadError) as info:
        load_yaml("a: [[1]]\n", "f.yaml", limits=YamlLimits(max_depth=2))
    assert [(e.line, e.message) for e in info.value.errors] == [(1, "nesting deeper than 2 levels")]
