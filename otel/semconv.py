"""Span attribute names: OpenTelemetry GenAI semantic conventions plus guardproxy's own.

One place for the strings, so the request path, the audit line and the dashboards agree on
spelling. GenAI names follow https://opentelemetry.io/docs/specs/semconv/gen-ai/ (development
status); ours live under the ``guardproxy.`` namespace.
"""

from __future__ import annotations

from typing import Final

# GenAI semantic conventions
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_RESPONSE_ID: Final = "gen_ai.response.id"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
GEN_AI_CONVERSATION_ID: Final = "gen_ai.conversation.id"
# Opt-in content capture only (TracingSettings.capture_content); see Tracing.record_content.
GEN_AI_INPUT_MESSAGES: Final = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES: Final = "gen_ai.output.messages"

# General semantic conventions
ERROR_TYPE: Final = "error.type"

# guardproxy
GUARDPROXY_DECISION_ID: Final = "guardproxy.decision.id"
GUARDPROXY_POLICY_REVISION: Final = "guardproxy.policy.revision"
GUARDPROXY_RULE_IDS: Final = "guardproxy.rule_ids"
GUARDPROXY_ACTIONS: Final = "guardproxy.actions"
GUARDPROXY_COST_ESTIMATED_USD: Final = "guardproxy.cost.estimated_usd"
GUARDPROXY_COST_ACTUAL_USD: Final = "guardproxy.cost.actual_usd"
GUARDPROXY_DOWNGRADED_FROM: Final = "guardproxy.downgraded_from"
GUARDPROXY_COMPRESSED_TOKENS: Final = "guardproxy.compressed_tokens"
GUARDPROXY_DEGRADED: Final = "guardproxy.degraded"
GUARDPROXY_SHADOW_WOULD: Final = "guardproxy.shadow.would"

__all__ = [
    "ERROR_TYPE",
    "GEN_AI_CONVERSATION_ID",
    "GEN_AI_INPUT_MESSAGES",
    "GEN_AI_OPERATION_NAME",
    "GEN_AI_OUTPUT_MESSAGES",
    "GEN_AI_PROVIDER_NAME",
    "GEN_AI_REQUEST_MODEL",
    "GEN_AI_RESPONSE_FINISH_REASONS",
    "GEN_AI_RESPONSE_ID",
    "GEN_AI_RESPONSE_MODEL",
    "GEN_AI_USAGE_INPUT_TOKENS",
    "GEN_AI_USAGE_OUTPUT_TOKENS",
    "GUARDPROXY_ACTIONS",
    "GUARDPROXY_COMPRESSED_TOKENS",
    "GUARDPROXY_COST_ACTUAL_USD",
    "GUARDPROXY_COST_ESTIMATED_USD",
    "GUARDPROXY_DECISION_ID",
    "GUARDPROXY_DEGRADED",
    "GUARDPROXY_DOWNGRADED_FROM",
    "GUARDPROXY_POLICY_REVISION",
    "GUARDPROXY_RULE_IDS",
    "GUARDPROXY_SHADOW_WOULD",
]
