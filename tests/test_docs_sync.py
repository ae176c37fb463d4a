"""The docs stay true to the code.

* ``docs/errors.md`` lists exactly the codes of :data:`proxy.errors.CODES`, with their HTTP status and type.
* ``docs/policy-reference.md`` documents every field of the policy model tree (:class:`rules.model.Policy`,
  by its YAML name: ``apiVersion``, ``schema``) and of the config model tree (:class:`proxy.config.Config`)
  at its dotted path, and documents no field that does not exist.
* Links between the docs point at files and headings that exist.
* A few behaviours the reference spells out (CEL error semantics, shadow schemas, conversation ids, output
  escalation in streams, the ``errors`` list of ``schema_validation_failed``) hold.
"""

from __future__ import annotations

import hashlib
import re
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import ROOT, SUPPORT_KEY, Mock, Proxy, default_config, free_port
from pydantic import BaseModel

from proxy.config import Config
from proxy.costing import conversation_id
from proxy.errors import CODES
from rules.compiler import compile_policies
from rules.decision import ToolCallIn
from rules.evaluate import Principal
from rules.evaluate_response import ResponseContext, evaluate_response
from rules.loader import load_policies
from rules.model import Policy

DOCS = ROOT / "docs"
ERRORS_MD = DOCS / "errors.md"
POLICY_MD = DOCS / "policy-reference.md"
ARCH_MD = DOCS / "ARCHITECTURE.md"
CONFIG_HEADING = "## Config file"

_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


# -- markdown helpers ----------------------------------------------------------------------------------------

def _tables(text: str) -> Iterator[tuple[list[str], list[list[str]]]]:
    """Every pipe table as (header cells, body rows of cells)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|\s*$", lines[i + 1]):
            header = _cells(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            yield header, rows
        else:
            i += 1


def _cells(line: str) -> list[str]:
    return [c.strip() for c in _CELL_SPLIT.split(line.strip())[1:-1]]


def _field_paths(text: str) -> set[str]:
    """Paths in the first column of every ``| field | ...`` table, with ``<tool>``-style keys as ``<>``."""
    out: set[str] = set()
    for header, rows in _tables(text):
        if not header or header[0] != "field":
            continue
        for row in rows:
            for span in _CODE_SPAN.findall(row[0]):
                out.add(re.sub(r"<[^>]*>", "<>", span))
    return out


def _policy_and_config_text() -> tuple[str, str]:
    text = POLICY_MD.read_text(encoding="utf-8")
    assert CONFIG_HEADING in text, f"{POLICY_MD.name} needs a '{CONFIG_HEADING}' section"
    policy, config = text.split(CONFIG_HEADING, 1)
    return policy, config


# -- model helpers -------------------------------------------------------------------------------------------

def _shape(tp: Any) -> Iterator[tuple[str, type[BaseModel]]]:
    """The models reachable from a field type, each with the path suffix it adds (``[]`` or ``.<>``)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        yield "", tp
    elif origin is typing.Annotated:
        yield from _shape(args[0])
    elif origin in (typing.Union, types.UnionType):
        for a in args:
            yield from _shape(a)
    elif origin in (tuple, list, set, frozenset):
        for a in args:
            if a is not Ellipsis:
                yield from (("[]" + suffix, m) for suffix, m in _shape(a))
    elif origin is dict:
        yield from ((".<>" + suffix, m) for suffix, m in _shape(args[1]))


def model_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every field's dotted path by its YAML name (alias), e.g. ``tools.allow.<>.rules[].id``."""
    out: set[str] = set()
    for name, info in model.model_fields.items():
        if info.exclude:
            continue  # internal, never written by users (Config.base_dir)
        key = info.alias or name
        path = f"{prefix}.{key}" if prefix else key
        out.add(path)
        for suffix, sub in _shape(info.annotation):
            out |= model_paths(sub, path + suffix)
    return out


# -- errors.md -----------------------------------------------------------------------------------------------

def _documented_codes() -> dict[str, tuple[str, str]]:
    """code -> (HTTP cell, type cell) from every ``| code | ...`` table of errors.md."""
    out: dict[str, tuple[str, str]] = {}
    for header, rows in _tables(ERRORS_MD.read_text(encoding="utf-8")):
        if not header or header[0] != "code":
            continue
        col = {name: i for i, name in enumerate(header)}
        for row in rows:
            m = re.fullmatch(r"`([a-z_]+)`", row[0])
            assert m, f"first cell of an errors.md code row must be `code`: {row[0]!r}"
            assert m.group(1) not in out, f"{m.group(1)} is listed twice"
            out[m.group(1)] = (row[col["HTTP"]], row[col["type"]].strip("`"))
    return out


def test_every_error_code_is_documented() -> None:
    missing = sorted(set(CODES) - set(_documented_codes()))
    assert not missing, f"codes in proxy.errors.CODES missing from docs/errors.md: {missing}"


def test_every_documented_error_code_exists() -> None:
    unknown = sorted(set(_documented_codes()) - set(CODES))
    assert not unknown, f"docs/errors.md documents codes that proxy.errors.CODES lacks: {unknown}"


def test_documented_status_and_type_match_the_code() -> None:
    documented = _documented_codes()
    wrong = {c: (documented[c], (str(s), t)) for c, (s, t) in CODES.items()
             if c in documented and documented[c] != (str(s), t)}
    assert not wrong, f"docs/errors.md disagrees with CODES (documented, actual): {wrong}"


# -- policy-reference.md -------------------------------------------------------------------------------------

def test_model_walk_sees_aliases_and_nested_fields() -> None:
    # guards the walk itself: a walk that stopped early would make the sync tests vacuous
    paths = model_paths(Policy)
    for p in ("apiVersion", "tools.allow.<>.schema", "tools.allow.<>.rules[].on_error", "output.schema",
              "output.deny_patterns[].regex", "cost.budgets[].minutes", "cost.ladder[].compress_to_tokens",
              "cost.compress.to_tokens", "models.params.<>.max", "on_store_error"):
        assert p in paths
    assert "api_version" not in paths and "tools.allow.<>.json_schema" not in paths
    cpaths = model_paths(Config)
    assert {"models[].price.cached_input_per_mtok", "keys[].key_sha256", "server.watch_interval_s"} <= cpaths
    assert "base_dir" not in cpaths


def test_every_policy_field_is_documented() -> None:
    policy_text, _ = _policy_and_config_text()
    documented = _field_paths(policy_text)
    missing = sorted(model_paths(Policy) - documented)
    assert not missing, f"policy fields missing from a field table in docs/policy-reference.md: {missing}"
    # and every field *name* appears as code somewhere (the brief's minimum, independent of table layout)
    names = {p.rsplit(".", 1)[-1].removesuffix("[]") for p in model_paths(Policy)}
    code = _FENCE.findall(policy_text) + _CODE_SPAN.findall(_FENCE.sub("", policy_text))
    spans = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", " ".join(code)))
    assert names <= spans, sorted(names - spans)


def test_every_documented_policy_field_exists() -> None:
    policy_text, _ = _policy_and_config_text()
    stale = sorted(_field_paths(policy_text) - model_paths(Policy))
    assert not stale, f"docs/policy-reference.md documents policy fields that do not exist: {stale}"


def test_every_config_field_is_documented_and_exists() -> None:
    _, config_text = _policy_and_config_text()
    documented = _field_paths(config_text)
    actual = model_paths(Config)
    assert not sorted(actual - documented), f"config fields not documented: {sorted(actual - documented)}"
    stale = sorted(documented - actual)
    assert not stale, f"documented config fields that do not exist: {stale}"


def test_every_yaml_example_in_the_reference_loads_and_compiles() -> None:
    policy_text, _ = _policy_and_config_text()
    blocks = re.findall(r"^```yaml\n(.*?)^```", policy_text, flags=re.M | re.S)
    assert len(blocks) >= 4
    head = "apiVersion: guardproxy/v1\nkind: Policy\nmetadata: {{name: example{}}}\nmatch: {{all: true}}\n"
    docs = [(f"example{i}", b if b.startswith("apiVersion") else head.format(i) + b)
            for i, b in enumerate(blocks)]
    loaded = load_policies(docs)
    assert not loaded.errors, [str(e) for e in loaded.errors]
    compiled, errors = compile_policies(loaded.policies)
    assert compiled is not None and len(compiled.policies) == len(blocks), [str(e) for e in errors]


def test_docs_mention_every_response_header() -> None:
    text = POLICY_MD.read_text(encoding="utf-8")
    from proxy.reqctx import RequestContext

    ctx = RequestContext(Principal("k"), revision="r", conversation="c", model_used="m",
                         actions=["a"], approval_ids=["apr_1"], degraded=True)
    for header in ctx.headers():
        assert f"`{header}`" in text, header


# -- links ---------------------------------------------------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's heading anchor."""
    s = heading.strip().lower().replace("`", "")
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


@pytest.mark.parametrize("doc", [ERRORS_MD, POLICY_MD, ARCH_MD], ids=lambda p: p.name)
def test_links_between_docs_resolve(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        assert path.exists(), f"{doc.name}: link to missing {target}"
        if anchor and path.suffix == ".md":
            headings = re.findall(r"^#{1,6} (.+)$", path.read_text(encoding="utf-8"), flags=re.M)
            slugs = {_slug(h) for h in headings}
            assert anchor in slugs, f"{doc.name}: no heading for #{anchor} in {path.name}"


# -- documented behaviour (pure) -----------------------------------------------------------------------------

def _eff(*docs: str) -> Any:
    loaded = load_policies([(f"p{i}.yaml", d) for i, d in enumerate(docs)])
    assert not loaded.errors, loaded.errors
    compiled, errors = compile_policies(loaded.policies)
    assert compiled is not None, errors
    return compiled.for_principal("k", None)


def _policy(name: str, body: str, mode: str = "enforce") -> str:
    head = f"apiVersion: guardproxy/v1\nkind: Policy\nmetadata: {{name: {name}}}\nmatch: {{all: true}}\n"
    return head + f"mode: {mode}\n" + body


CTX = ResponseContext(Principal("k"), "gpt-4o-mini")


def _call(args: dict[str, Any], name: str = "t") -> ToolCallIn:
    return ToolCallIn(0, "c1", name, orjson.dumps(args).decode())


@pytest.mark.parametrize(("action", "on_error", "verdict"), [
    ("deny", "match", "deny"),                   # an erroring restrictive rule counts as matching
    ("require_approval", "match", "hold"),
    ("deny", "skip", "allow"),                   # unless it says on_error: skip
    ("allow", "match", "allow"),                 # an allow rule never matches on error
])
def test_cel_runtime_error_semantics(action: str, on_error: str, verdict: str) -> None:
    eff = _eff(_policy("p", f"""tools:
  allow:
    t:
      rules: [{{id: r, when: "args.missing > 1", action: {action}, on_error: {on_error}}}]
"""))
    d = evaluate_response(eff, [_call({"present": 1})], None, CTX, now=0)
    assert d.calls[0].verdict == verdict
    assert any("r:" in e for e in d.errors)  # the runtime error is recorded either way


def test_output_rewrite_rule_does_not_match_on_error_but_deny_does() -> None:
    rule = 'output:\n  rules: [{id: r, when: "output.x > 1", action: %s}]\n'
    for action, verdict in (("rewrite, set: {y: 1}", "allow"), ("deny", "deny")):
        out = evaluate_response(_eff(_policy("p", rule % action)), [], '{"a": 1}', CTX, now=0).output
        assert out is not None and out.verdict == verdict, action


def test_shadow_policy_schemas_are_reported_not_enforced() -> None:
    shadow = _policy("s", """tools:
  allow:
    t: {schema: {type: object, required: [a]}, on_invalid: deny}
output:
  schema: {type: object, required: [z]}
  on_invalid: deny
""", mode="shadow")
    d = evaluate_response(_eff(shadow), [_call({"b": 1})], '{"y": 1}', CTX, now=0)
    assert d.calls[0].verdict == "allow" and d.output is not None and d.output.verdict == "allow"
    assert set(d.would) == {"would_schema_invalid:t", "would_schema_invalid:output"}
    # the same schemas enforced: both are invalid
    enforced = _eff(shadow.replace("mode: shadow", "mode: enforce"))
    d = evaluate_response(enforced, [_call({"b": 1})], '{"y": 1}', CTX, now=0)
    assert d.calls[0].verdict == "invalid" and d.output is not None and d.output.verdict == "invalid"


def test_conversation_id_is_the_header_else_a_hash_of_key_system_and_first_user() -> None:
    p = Principal("support-agent", "support")
    body = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                         {"role": "assistant", "content": "A"}, {"role": "user", "content": "U2"}]}
    assert conversation_id(p, body, "conv-1") == "conv-1"
    assert conversation_id(p, body, "x" * 200) == "x" * 128
    expected = "auto-" + hashlib.sha256(b"support-agent\x00S\x00U1").hexdigest()[:24]
    assert conversation_id(p, body, None) == expected
    # later turns of the same conversation derive the same id
    assert conversation_id(p, {"messages": body["messages"][:2]}, None) == expected


# -- documented behaviour (live) -----------------------------------------------------------------------------

ESCALATING = _policy("esc", """tools:
  escalate_to: escalate_to_human
output:
  schema: {type: object, required: [answer], properties: {answer: {type: string}}}
  on_invalid: escalate
""")
DENYING = _policy("strict", """output:
  schema: {type: object, required: [answer], properties: {answer: {type: string}}}
  on_invalid: deny
""")


@pytest.fixture(scope="module")
def esc_proxy(make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> Proxy:
    cfg = default_config(mock_upstream.url, free_port())
    cfg["keys"].append({"id": "strict", "key": "sk-test-strict", "team": "strict"})
    strict = DENYING.replace("match: {all: true}", "match: {keys: [strict]}")
    escalating = ESCALATING.replace("match: {all: true}", "match: {keys: [support-agent]}")
    return make_proxy(policies={"esc.yaml": escalating, "strict.yaml": strict}, config=cfg)


def _sse(resp: httpx.Response) -> list[Any]:
    return [orjson.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in resp.text.splitlines() if line.startswith("data: ")]


def test_output_on_invalid_escalate_in_a_stream_becomes_an_escalation_call(esc_proxy: Proxy,
                                                                          mock_upstream: Mock) -> None:
    mock_upstream.reset()
    mock_upstream.script({"content": "free text, not the required JSON"})
    resp = esc_proxy.post("/v1/chat/completions", SUPPORT_KEY, json={
        "model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200
    events = _sse(resp)
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if isinstance(e, dict) and e.get("choices")]
    calls = [tc for d in deltas for tc in d.get("tool_calls") or ()]
    assert [c["function"]["name"] for c in calls] == ["escalate_to_human"]
    assert orjson.loads(calls[0]["function"]["arguments"])["reason"].startswith("invalid output:")
    assert not any(d.get("content") for d in deltas), "the invalid text must not reach the client"
    chunks = [e for e in events[:-1] if isinstance(e, dict) and e.get("choices")]
    finishes = [e["choices"][0]["finish_reason"] for e in chunks]
    assert finishes[-1] == "tool_calls"


def test_schema_validation_failed_carries_errors_in_json_and_in_the_stream(esc_proxy: Proxy,
                                                                            mock_upstream: Mock) -> None:
    mock_upstream.reset()
    mock_upstream.script({"content": '{"answer": 42}'}, {"content": '{"answer": 42}'})
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    resp = esc_proxy.post("/v1/chat/completions", "sk-test-strict", json=body)
    assert resp.status_code == 422
    err = resp.json()["error"]
    assert err["code"] == "schema_validation_failed"
    assert err["errors"] and err["errors"][0].startswith("/answer")
    assert err["decision_id"] == resp.headers["x-guardproxy-decision-id"]
    resp = esc_proxy.post("/v1/chat/completions", "sk-test-strict", json={**body, "stream": True})
    assert resp.status_code == 200
    events = _sse(resp)
    assert "[DONE]" not in events  # a failed stream ends with the error event, no [DONE]
    last = events[-1]["error"]
    assert last["code"] == "schema_validation_failed" and last["errors"][0].startswith("/answer")
