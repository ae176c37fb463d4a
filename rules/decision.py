"""Decisions are values: what the evaluator concluded, for the shell to apply and record.

A :class:`Decision` carries the effect, the matched rule ids, human reasons, the
compact action list (``tool_stripped:delete_account``), shadow-mode findings
(``would_deny:...``), validator errors and the policy revision. The shell adds a
decision id and writes the same value to headers, spans and the audit line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Effect = Literal["allow", "modify", "deny"]
Verdict = Literal["allow", "deny", "escalate", "hold", "invalid"]


@dataclass(frozen=True)
class Refusal:
    """The request is refused: the shell answers with this error code."""

    code: str
    message: str
    rule_id: str
    param: str | None = None


@dataclass
class Trail:
    """Accumulates what an evaluation found; frozen into a :class:`Decision` at the end."""

    rule_ids: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    would: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def act(self, action: str, rule_id: str | None, reason: str | None, *, shadow: bool = False) -> None:
        """Record an enforced action, or a ``would_*`` finding when ``shadow``."""
        if shadow:
            self.would.append(f"would_{action}")
        else:
            self.actions.append(action)
        if rule_id and rule_id not in self.rule_ids:
            self.rule_ids.append(rule_id)
        if reason and not shadow:
            self.reasons.append(reason)


@dataclass(frozen=True)
class Decision:
    """The common part of every decision."""

    effect: Effect
    revision: str
    rule_ids: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()
    would: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class RequestDecision(Decision):
    """Outcome of the request side: refuse, or forward ``body`` (``changed`` if rewritten)."""

    refusal: Refusal | None = None
    body: dict[str, Any] | None = None
    changed: bool = False


@dataclass(frozen=True)
class ToolCallIn:
    """A tool call as the model emitted it (arguments are the raw string)."""

    index: int
    id: str | None
    name: str
    arguments: str
    legacy: bool = False


@dataclass(frozen=True)
class CallVerdict:
    """What happens to one tool call."""

    call: ToolCallIn
    verdict: Verdict
    rule_id: str | None = None
    reason: str = ""
    args: Any = None
    args_hash: str | None = None
    errors: tuple[str, ...] = ()
    on_invalid: str = "deny"
    max_repairs: int = 0
    once: bool = False
    shadow_once: bool = False  # a shadow policy marks the tool once-per-conversation: report repeats
    # For "escalate": the rewritten call, and the decision on it (every layer's; "allow" or "hold").
    new_name: str | None = None
    new_arguments: str | None = None
    then: CallVerdict | None = None


@dataclass(frozen=True)
class OutputVerdict:
    """What happens to the assistant's text content."""

    verdict: Literal["allow", "rewrite", "deny", "invalid", "escalate"]
    content: str | None = None
    rule_id: str | None = None
    reason: str = ""
    errors: tuple[str, ...] = ()
    on_invalid: str = "deny"
    max_repairs: int = 0
    escalation: CallVerdict | None = None  # "escalate": the call that replaces the output, as decided


@dataclass(frozen=True)
class ResponseDecision(Decision):
    """Outcome of the response side: a verdict per tool call and one for the content."""

    calls: tuple[CallVerdict, ...] = ()
    output: OutputVerdict | None = None
