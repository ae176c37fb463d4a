"""Policy test cases (``guardproxy test``): the case format, and judging one case.

A case file holds ``cases: [...]``. Each case names a principal and either a
``request`` (an OpenAI chat body, judged by :func:`~rules.evaluate.evaluate_request`)
or a ``response`` (tool calls and content, judged by
:func:`~rules.evaluate_response.evaluate_response`), plus what it expects.
Only the fields a case lists are compared, so a case states exactly what it is
about. ``rule_ids``, ``actions`` and ``would`` compare as sets (their order is an
evaluation detail); ``tools`` and ``calls`` compare in order.

Pure like the rest of ``rules/``: the shell reads the files and prints.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Tag, ValidationError

from rules.compiler import CompiledPolicySet
from rules.decision import RequestDecision, ResponseDecision, ToolCallIn
from rules.evaluate import Principal, evaluate_request
from rules.evaluate_response import ResponseContext, evaluate_response
from rules.schemas import CompiledSchema, SchemaDefinitionError, compile_schema
from rules.yamlsrc import Located, SourceError, pydantic_errors

__all__ = ["Case", "CaseResult", "LocatedCase", "judge", "parse_cases", "render", "render_diff"]

MISSING = "<missing>"
_SETS = ("rule_ids", "actions", "would")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrincipalSpec(_Strict):
    key: str
    team: str | None = None
    org: str = "default"


class RequestExpect(_Strict):
    decision: Literal["allow", "modify", "deny"]
    code: Literal["model_not_allowed", "tool_not_allowed"] | None = None
    rule_ids: list[str] | None = None
    tools: list[str] | None = None
    actions: list[str] | None = None
    would: list[str] | None = None
    params: dict[str, Any] | None = None  # request fields after evaluation, e.g. clamped temperature


class CallExpect(_Strict):
    name: str
    verdict: Literal["allow", "deny", "escalate", "hold", "invalid"]
    rule_id: str | None = None
    new_name: str | None = None


class OutputExpect(_Strict):
    verdict: Literal["allow", "rewrite", "deny", "invalid"]
    content_contains: dict[str, Any] | None = None


class ResponseExpect(_Strict):
    decision: Literal["allow", "modify", "deny"]
    calls: list[CallExpect] | None = None
    output: OutputExpect | None = None
    rule_ids: list[str] | None = None
    actions: list[str] | None = None
    would: list[str] | None = None


class ToolCallSpec(_Strict):
    name: str
    arguments: str | dict[str, Any] = "{}"  # a mapping is serialized; a string is sent as is


class ModelResponse(_Strict):
    tool_calls: list[ToolCallSpec] = []
    content: str | dict[str, Any] | None = None
    model: str = "gpt-4o-mini"
    request_tools: list[dict[str, Any]] = []  # the request's declared tools (their parameter schemas)
    response_format: dict[str, Any] | None = None


class RequestCase(_Strict):
    name: str
    note: str = ""
    principal: PrincipalSpec
    request: dict[str, Any]
    expect: RequestExpect


class ResponseCase(_Strict):
    name: str
    note: str = ""
    principal: PrincipalSpec
    response: ModelResponse
    expect: ResponseExpect


def _kind(value: Any) -> str | None:
    if isinstance(value, dict) and ("request" in value) != ("response" in value):
        return "request-case" if "request" in value else "response-case"
    return None


# Tags are not keys of the data, so located errors skip them and point at the real field.
Case = Annotated[
    Annotated[RequestCase, Tag("request-case")] | Annotated[ResponseCase, Tag("response-case")],
    Discriminator(_kind, custom_error_type="case_kind",
                  custom_error_message="a case needs exactly one of request: or response:"),
]


class CaseFile(_Strict):
    cases: list[Case]


@dataclass(frozen=True)
class LocatedCase:
    """A validated case and where it was written."""

    case: RequestCase | ResponseCase
    source: str
    line: int | None


@dataclass(frozen=True)
class CaseResult:
    """Expected and actual, projected onto the fields the case lists."""

    passed: bool
    expected: dict[str, Any]
    actual: dict[str, Any]
    full: dict[str, Any]  # everything observed, for ``--verbose``


def parse_cases(located: Located) -> tuple[list[LocatedCase], list[SourceError]]:
    """Validate one parsed case file; errors carry file and line."""
    src = located.source
    if not isinstance(located.data, dict):
        return [], [SourceError(src, 1, "", "a case file must be a mapping with a cases: list")]
    try:
        doc = CaseFile.model_validate(located.data)
    except ValidationError as exc:
        return [], _named_missing(exc, pydantic_errors(exc, located))
    out: list[LocatedCase] = []
    errors: list[SourceError] = []
    seen: set[str] = set()
    for i, case in enumerate(doc.cases):
        line = located.line_of(("cases", i))
        if case.name in seen:
            errors.append(SourceError(src, located.line_of(("cases", i, "name")), f"cases[{i}].name",
                                      f"duplicate case name {case.name!r}"))
        seen.add(case.name)
        out.append(LocatedCase(case, src, line))
    return out, errors


def _named_missing(exc: ValidationError, errors: list[SourceError]) -> list[SourceError]:
    """Say which field is missing: the located path stops at its parent."""
    out = []
    for raw, err in zip(exc.errors(), errors, strict=True):
        loc = raw.get("loc", ())
        if raw.get("type") == "missing" and loc and isinstance(loc[-1], str):
            err = SourceError(err.source, err.line, err.path, f"missing required field {loc[-1]!r}")
        out.append(err)
    return out


def judge(compiled: CompiledPolicySet, case: RequestCase | ResponseCase) -> CaseResult:
    """Evaluate one case against the compiled set and compare with its expectation."""
    p = case.principal
    principal = Principal(p.key, p.team, p.org)
    eff = compiled.for_principal(p.key, p.team, p.org)
    if isinstance(case, RequestCase):
        full = _request_facts(evaluate_request(eff, case.request, principal, now=0.0), case.request)
    else:
        full = _response_facts(compiled, case, principal)
    expected = case.expect.model_dump(exclude_none=True)
    actual = _project(expected, full)
    return CaseResult(_same(expected, actual), expected, actual, full)


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps ``true`` apart from ``1`` (Python's ``True == 1`` would hide a wrong type)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _tool_names(body: dict[str, Any] | None) -> list[str]:
    names: list[str] = []
    for item in (body or {}).get("tools") or ():
        fn = item.get("function") if isinstance(item, dict) else None
        names.append(str(fn.get("name")) if isinstance(fn, dict) else MISSING)
    for item in (body or {}).get("functions") or ():
        names.append(str(item.get("name")) if isinstance(item, dict) else MISSING)
    return names


def _request_facts(d: RequestDecision, request: dict[str, Any]) -> dict[str, Any]:
    body = d.body if d.refusal is None else None
    return {
        "decision": d.effect, "code": d.refusal.code if d.refusal else None, "rule_ids": list(d.rule_ids),
        "tools": _tool_names(body), "actions": list(d.actions), "would": list(d.would),
        "params": {k: v for k, v in (body or {}).items() if k not in ("messages", "tools", "functions")},
    }


def _args(spec: ToolCallSpec) -> str:
    return spec.arguments if isinstance(spec.arguments, str) else json.dumps(spec.arguments)


def _content(resp: ModelResponse) -> str | None:
    return resp.content if resp.content is None or isinstance(resp.content, str) else json.dumps(resp.content)


def _declared(compiled_names: set[str], resp: ModelResponse) -> dict[str, CompiledSchema]:
    out: dict[str, CompiledSchema] = {}
    for t in resp.request_tools:
        fn = t.get("function", t)  # accept OpenAI {type, function: {...}} or the bare function
        if (isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("parameters"), dict)
                and fn["name"] not in compiled_names):  # as the proxy does: pinned schemas win
            out[fn["name"]] = compile_schema(fn["parameters"])
    return out


def _response_facts(compiled: CompiledPolicySet, case: ResponseCase, principal: Principal) -> dict[str, Any]:
    resp = case.response
    eff = compiled.for_principal(principal.key_id, principal.team, principal.org)
    try:
        declared = _declared(set(eff.tool_schemas), resp)
        rf = resp.response_format or {}
        js = rf.get("json_schema") if rf.get("type") == "json_schema" else None
        schema = js.get("schema") if isinstance(js, dict) else None
        response_schema = compile_schema(schema) if isinstance(schema, dict) else None
    except SchemaDefinitionError as exc:
        return {"decision": "error", "error": f"case declares an invalid schema: {exc}"}
    ctx = ResponseContext(principal, resp.model, declared, response_schema)
    calls = [ToolCallIn(i, f"call_{i}", c.name, _args(c)) for i, c in enumerate(resp.tool_calls)]
    content = _content(resp)
    d: ResponseDecision = evaluate_response(eff, calls, content, ctx, now=0.0)
    out_verdict, out_text = ("allow", content) if d.output is None else (
        d.output.verdict, d.output.content if d.output.verdict == "rewrite" else content)
    return {
        "decision": d.effect, "rule_ids": list(d.rule_ids), "actions": list(d.actions), "would": list(d.would),
        "calls": [{"name": v.call.name, "verdict": v.verdict, "rule_id": v.rule_id, "new_name": v.new_name,
                   "new_arguments": _parse(v.new_arguments), "errors": list(v.errors)}
                  for v in d.calls],
        "output": {"verdict": out_verdict, "content": _parse(out_text)},
        "errors": list(d.errors),
    }


def _parse(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _project(expected: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    if "error" in full:
        return {"error": full["error"]}
    actual: dict[str, Any] = {}
    for key, want in expected.items():
        have: Any = full.get(key)
        if key in _SETS:
            # Order is an evaluation detail: show the expected order when the sets agree.
            actual[key] = list(want) if sorted(have or []) == sorted(want) else have
        elif key == "params":
            actual[key] = {k: have.get(k) for k in want}
        elif key == "calls":
            actual[key] = _project_calls(want, have)
        elif key == "output":
            actual[key] = _project_output(want, have)
        else:
            actual[key] = have
    return actual


def _project_calls(want: list[dict[str, Any]], have: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, call in enumerate(have):
        keys = want[i].keys() if i < len(want) else ("name", "verdict")
        out.append({k: call.get(k) for k in keys})
    return out


def _project_output(want: dict[str, Any], have: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"verdict": have["verdict"]}
    if "content_contains" in want:
        content = have["content"]
        if isinstance(content, dict):
            out["content_contains"] = {k: content.get(k, MISSING) for k in want["content_contains"]}
        else:
            out["content_contains"] = {k: MISSING for k in want["content_contains"]}
    return out


def render_diff(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """A unified diff of expected vs actual as YAML (``-`` expected, ``+`` actual)."""
    def dump(v: dict[str, Any]) -> list[str]:
        return yaml.safe_dump(v, sort_keys=False, default_flow_style=False, allow_unicode=True).splitlines()

    return list(difflib.unified_diff(dump(expected), dump(actual), "expected", "actual", lineterm="", n=1000))


def render(value: dict[str, Any]) -> list[str]:
    """``value`` as YAML lines (for verbose output)."""
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False, allow_unicode=True).splitlines()
