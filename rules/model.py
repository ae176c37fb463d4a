"""The policy file format (``apiVersion: guardproxy/v1``, ``kind: Policy``) as frozen models.

Every field users can write is declared here with ``extra='forbid'``, so a typo
fails at load with file and line. Documented field by field in
``docs/policy-reference.md``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rules.cost import CostSpec

Mode = Literal["enforce", "shadow"]
ToolAction = Literal["deny", "escalate", "require_approval", "allow"]
OutputAction = Literal["rewrite", "deny"]
OnInvalid = Literal["repair", "deny", "escalate"]

NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"
RULE_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Metadata(_Frozen):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""


class Match(_Frozen):
    """Which principals a policy applies to: listed keys, listed teams, or everyone."""

    keys: tuple[str, ...] = ()
    teams: tuple[str, ...] = ()
    all: bool = False

    @model_validator(mode="after")
    def _not_empty(self) -> Match:
        if not (self.all or self.keys or self.teams):
            raise ValueError("match needs keys, teams or all: true")
        if self.all and (self.keys or self.teams):
            raise ValueError("match.all cannot be combined with keys or teams")
        return self


class ParamLimit(_Frozen):
    """Bounds for one numeric request parameter; out-of-range values are clamped."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> ParamLimit:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        return self


class ModelsSpec(_Frozen):
    allow: tuple[str, ...] | None = None
    params: dict[str, ParamLimit] = Field(default_factory=dict)


class ToolRule(_Frozen):
    """A CEL condition on a tool call's arguments and what to do when it holds."""

    id: str = Field(pattern=RULE_ID_PATTERN)
    when: str = Field(min_length=1)
    action: ToolAction
    reason: str = ""
    mode: Mode | None = None
    on_error: Literal["match", "skip"] = "match"


class ToolSpec(_Frozen):
    rules: tuple[ToolRule, ...] = ()
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    on_invalid: OnInvalid = "repair"
    max_repairs: int = Field(default=1, ge=0, le=5)
    once_per_conversation: bool = False


class ToolsSpec(_Frozen):
    default: Literal["allow", "deny"] = "allow"
    escalate_to: str | None = None
    allow: dict[str, ToolSpec] = Field(default_factory=dict)
    deny: tuple[str, ...] = ()

    @field_validator("allow", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        # ``get_customer_account:`` with nothing after it is as good as ``{}``.
        if isinstance(v, dict):
            return {k: ({} if spec is None else spec) for k, spec in v.items()}
        return v


class OutputRule(_Frozen):
    """A CEL condition on a structured (JSON) output."""

    id: str = Field(pattern=RULE_ID_PATTERN)
    when: str = Field(min_length=1)
    action: OutputAction
    set: dict[str, Any] | None = None
    reason: str = ""
    mode: Mode | None = None
    on_error: Literal["match", "skip"] = "match"

    @model_validator(mode="after")
    def _set_for_rewrite(self) -> OutputRule:
        if self.action == "rewrite" and not self.set:
            raise ValueError("action rewrite needs set: {field: value}")
        return self


class ContentPattern(_Frozen):
    """An RE2 regular expression that assistant text must not match."""

    id: str = Field(pattern=RULE_ID_PATTERN)
    regex: str = Field(min_length=1)
    reason: str = ""
    mode: Mode | None = None


class OutputSpec(_Frozen):
    rules: tuple[OutputRule, ...] = ()
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    on_invalid: OnInvalid = "repair"
    max_repairs: int = Field(default=1, ge=0, le=5)
    deny_patterns: tuple[ContentPattern, ...] = ()


class Policy(_Frozen):
    """One policy document."""

    api_version: Literal["guardproxy/v1"] = Field(alias="apiVersion")
    kind: Literal["Policy"]
    metadata: Metadata
    match: Match
    mode: Mode = "enforce"
    models: ModelsSpec = Field(default_factory=ModelsSpec)
    tools: ToolsSpec = Field(default_factory=ToolsSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    cost: CostSpec | None = None
    on_store_error: Literal["fail_closed", "fail_open"] = "fail_closed"

    @property
    def level(self) -> int:
        """0 org-wide, 1 team, 2 key: more specific policies have higher levels."""
        if self.match.all:
            return 0
        return 2 if self.match.keys else 1
