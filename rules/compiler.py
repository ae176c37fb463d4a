"""Stage 2: validated policies -> one immutable :class:`CompiledPolicySet`.

Everything that can be prepared ahead is prepared here: CEL programs,
JSON-schema validators, RE2 patterns, glob matchers. The set's ``revision`` is
a content hash, so two replicas with the same files report the same revision.
Problems a user should fix are collected as located errors; attempts of a
lower policy to loosen a higher one are reported as warnings, and limits that
no value can satisfy together are errors.

Deny entries without wildcards are a case-folded name set; wildcard globs are
one case-insensitive RE2 alternation, at most :data:`MAX_DENY_GLOBS` a policy
(a big alternation exceeds RE2's program size and compiles in super-linear
time; names are not limited).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson
import re2

from rules.celexpr import CelCompileError, Condition, compile_condition, new_env
from rules.effective import (
    DEFAULT_ORG,
    CompiledPolicy,
    Effective,
    Gate,
    OutputRuleC,
    PatternC,
    SchemaC,
    ToolRuleC,
    build_effective,
    team_ref,
)
from rules.layering import interval_errors, loosening_warnings
from rules.loader import LoadedPolicy
from rules.schemas import SchemaDefinitionError, compile_schema
from rules.yamlsrc import Path, SourceError, format_path

TOOL_NAME_RE = "^[A-Za-z0-9_-]{1,64}$"
MAX_DENY_GLOBS = 1000  # wildcard globs (with * or ?) in one policy's tools.deny


@dataclass
class CompiledPolicySet:
    """All policies in force, plus a per-principal cache of their combination."""

    policies: tuple[CompiledPolicy, ...]
    revision: str
    warnings: tuple[SourceError, ...] = ()
    _effective: dict[tuple[str, str | None, str], Effective] = field(default_factory=dict, repr=False)

    def for_principal(self, key_id: str, team: str | None, org: str = DEFAULT_ORG) -> Effective:
        """The restrictive combination of every policy matching the principal (memoized)."""
        cache_key = (key_id, team, org)
        eff = self._effective.get(cache_key)
        if eff is None:
            matched = [p for p in self.policies if p.matches(key_id, team, org)]
            eff = build_effective(matched, self.revision)
            if len(self._effective) < 100_000:
                self._effective[cache_key] = eff
        return eff


def re2_options() -> Any:
    """RE2 options for policy patterns: a failure becomes a located error, so RE2 must not also print it."""
    opts = re2.Options()
    opts.log_errors = False
    return opts


# The wording of compile errors, shared with rules.precheck (which compiles what validation refused).
def cel_error(exc: CelCompileError) -> str:
    """The message for a condition that does not compile."""
    col = f" (column {exc.column})" if exc.column else ""
    return f"invalid CEL{col}: {exc}"


def schema_error(exc: SchemaDefinitionError) -> str:
    """The message for a schema that does not compile."""
    return f"invalid JSON schema: {exc}"


def regex_error(exc: Exception) -> str:
    """The message for a pattern RE2 refuses."""
    return "invalid RE2 regex: " + _re2_message(exc)


def glob_to_re2(pattern: str) -> str:
    """``delete_*`` -> an anchored RE2 pattern; ``*`` and ``?`` are the only wildcards."""
    out = []
    for ch in pattern:
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        else:
            out.append(re2.escape(ch))
    return "^" + "".join(out) + "$"


class _Compiler:
    def __init__(self, loaded: LoadedPolicy) -> None:
        self.loaded = loaded
        self.policy = loaded.policy
        self.errors: list[SourceError] = []
        self.env = new_env()

    def err(self, path: Path, message: str) -> None:
        line = self.loaded.located.line_of(path)
        self.errors.append(SourceError(self.loaded.located.source, line, format_path(path), message))

    def cond(self, path: Path, source: str) -> Condition | None:
        try:
            return compile_condition(self.env, source)
        except CelCompileError as exc:
            self.err(path, cel_error(exc))
            return None

    def schema(self, path: Path, schema: dict[str, Any], on_invalid: str, max_repairs: int) -> SchemaC | None:
        try:
            compiled = compile_schema(schema)
        except SchemaDefinitionError as exc:
            self.err(path, schema_error(exc))
            return None
        return SchemaC(compiled, on_invalid, max_repairs, self.policy.metadata.name,
                       self.policy.mode == "shadow", self.policy.level)

    def deny(self) -> tuple[frozenset[str], Any]:
        """``tools.deny`` as (case-folded exact names, one case-insensitive RE2 of the wildcard globs)."""
        names: set[str] = set()
        globs: list[str] = []
        for i, glob in enumerate(self.policy.tools.deny):
            if not glob:
                self.err(("tools", "deny", i), "empty pattern")
            elif "*" in glob or "?" in glob:
                globs.append(glob_to_re2(glob))
            else:
                names.add(glob.casefold())
        if not globs:
            return frozenset(names), None
        if len(globs) > MAX_DENY_GLOBS:
            self.err(("tools", "deny"), f"{len(globs)} patterns with * or ?; at most {MAX_DENY_GLOBS} per policy "
                                        "(plain names are not limited)")
            return frozenset(names), None
        opts = re2_options()
        opts.case_sensitive = False
        try:
            return frozenset(names), re2.compile("|".join(f"(?:{r})" for r in globs), options=opts)
        except re2.error as exc:
            self.err(("tools", "deny"), f"the {len(globs)} patterns with * or ? do not compile together "
                                        f"({_re2_message(exc)}); use fewer or simpler patterns")
            return frozenset(names), None

    def teams(self) -> frozenset[tuple[str, str]]:
        refs = set()
        for i, entry in enumerate(self.policy.match.teams):
            org, team = team_ref(entry)
            if not org or not team:
                self.err(("match", "teams", i), f"team {entry!r} must be a team name or org/team")
            refs.add((org, team))
        return frozenset(refs)

    def run(self) -> CompiledPolicy | None:
        p = self.policy
        shadow = p.mode == "shadow"
        name = p.metadata.name
        level = p.level
        teams = self.teams()
        deny_names, deny_re = self.deny()
        valid_name = re2.compile(TOOL_NAME_RE)
        for tool in p.tools.allow:
            if not valid_name.fullmatch(tool):
                self.err(("tools", "allow", tool), "tool names must match ^[A-Za-z0-9_-]{1,64}$")
        gate = Gate(name, shadow, p.tools.default == "deny", frozenset(p.tools.allow), deny_re, deny_names)
        target = p.tools.escalate_to
        # An escalation tool the policy itself blocks (unlisted, or matched by tools.deny) could never be used.
        if target is not None and (not valid_name.fullmatch(target) or gate.blocks(target)):
            self.err(("tools", "escalate_to"), f"escalation tool {target!r} is not allowed by tools.allow/deny")
        tool_rules: dict[str, tuple[ToolRuleC, ...]] = {}
        tool_schemas: dict[str, SchemaC] = {}
        for tool, spec in p.tools.allow.items():
            compiled_rules = []
            for i, rule in enumerate(spec.rules):
                c = self.cond(("tools", "allow", tool, "rules", i, "when"), rule.when)
                if c is None:
                    continue
                if rule.action == "escalate" and not self._escalation_tool():
                    self.err(("tools", "allow", tool, "rules", i, "action"),
                             "action escalate needs tools.escalate_to")
                rule_shadow = shadow or rule.mode == "shadow"
                compiled_rules.append(
                    ToolRuleC(rule.id, c, rule.action, rule.reason, rule_shadow, rule.on_error, name, level)
                )
            if compiled_rules:
                tool_rules[tool] = tuple(compiled_rules)
            if spec.json_schema is not None:
                s = self.schema(("tools", "allow", tool, "schema"), spec.json_schema, spec.on_invalid,
                                spec.max_repairs)
                if s is not None:
                    tool_schemas[tool] = s
            if spec.on_invalid == "escalate" and not self._escalation_tool():
                self.err(("tools", "allow", tool, "on_invalid"), "on_invalid escalate needs tools.escalate_to")
        output_rules = []
        for i, orule in enumerate(p.output.rules):
            c = self.cond(("output", "rules", i, "when"), orule.when)
            if c is not None:
                output_rules.append(OutputRuleC(orule.id, c, orule.action, orule.set or {}, orule.reason,
                                                shadow or orule.mode == "shadow", orule.on_error, name, level))
        output_schema = None
        if p.output.json_schema is not None:
            output_schema = self.schema(("output", "schema"), p.output.json_schema, p.output.on_invalid,
                                        p.output.max_repairs)
        patterns = []
        for i, pat in enumerate(p.output.deny_patterns):
            try:
                rx = re2.compile(pat.regex, options=re2_options())
            except re2.error as exc:
                self.err(("output", "deny_patterns", i, "regex"), regex_error(exc))
                continue
            patterns.append(PatternC(pat.id, rx, pat.reason, shadow or pat.mode == "shadow", name, level))
        self._check_cost()
        if self.errors:
            return None
        return CompiledPolicy(p, self.loaded.located.source, shadow, gate, tool_rules, tool_schemas,
                              tuple(output_rules), output_schema, tuple(patterns), teams)

    def _escalation_tool(self) -> bool:
        return self.policy.tools.escalate_to is not None

    def _check_cost(self) -> None:
        cost = self.policy.cost
        if cost is None:
            return
        allowed = self.policy.models.allow
        for i, step in enumerate(cost.ladder):
            for src, dst in (step.downgrade or {}).items():
                if allowed is not None and dst not in allowed:
                    self.err(("cost", "ladder", i, "downgrade", src),
                             f"downgrade target {dst!r} is not in models.allow")


def _re2_message(exc: Exception) -> str:
    arg = exc.args[0] if exc.args else ""  # RE2 gives its message as bytes
    return arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)


def _revision(policies: list[LoadedPolicy]) -> str:
    h = hashlib.sha256()
    for lp in sorted(policies, key=lambda x: x.policy.metadata.name):
        h.update(orjson.dumps(lp.policy.model_dump(mode="json", by_alias=True), option=orjson.OPT_SORT_KEYS))
    return h.hexdigest()[:12]


def compile_policies(policies: list[LoadedPolicy]) -> tuple[CompiledPolicySet | None, list[SourceError]]:
    """Compile every policy; on any error return ``(None, errors)`` so the old set stays in force."""
    errors: list[SourceError] = []
    compiled: list[CompiledPolicy] = []
    for lp in policies:
        c = _Compiler(lp)
        result = c.run()
        errors.extend(c.errors)
        if result is not None:
            compiled.append(result)
    if errors:
        return None, errors
    compiled.sort(key=lambda cp: (cp.policy.level, cp.name))
    by_name = {lp.policy.metadata.name: lp for lp in policies}
    errors = interval_errors(compiled, by_name)
    if errors:
        return None, errors
    warnings = loosening_warnings(compiled, by_name)
    return CompiledPolicySet(tuple(compiled), _revision(policies), tuple(warnings)), []
