"""Deterministic context compression: drop whole old turns until the prompt fits a token target.

What is always kept: every ``system`` / ``developer`` message, the latest ``user`` message and everything
after it (the turn being answered). Earlier history is grouped into *turns* (a turn starts at a user
message; anything before the first user message is one leading turn), and whole turns are kept newest
first while they fit; the first turn that does not fit and all older ones are dropped. Keeping turns
contiguous means the kept history still starts at a user message.

Because only whole turns go, an assistant message carrying ``tool_calls`` (or a legacy
``function_call``) leaves or stays together with the ``tool`` / ``function`` results that follow it:
in a valid request no user message sits between a call and its results, so they share a turn. If even
the kept core exceeds the target, the core is returned as is; a history with no user message is
returned unchanged. Original order is preserved; messages are the caller's objects, never edited.

Token counts come from the caller's callback, so this module stays pure and tokenizer-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PINNED_ROLES = frozenset({"system", "developer"})


@dataclass(frozen=True)
class CompressResult:
    """The compressed history, how many messages were dropped, and token totals before and after."""

    messages: list[dict[str, Any]]
    dropped: int
    tokens_before: int
    tokens_after: int


def compress_messages(
    messages: list[dict[str, Any]],
    to_tokens: int,
    count: Callable[[dict[str, Any]], int],
) -> CompressResult:
    """Drop the oldest whole turns of ``messages`` until their total ``count`` is at most ``to_tokens``.

    Deterministic: the same input always yields the same output. Never returns an empty list for a
    non-empty input, never splits a tool call from its results; may stay above ``to_tokens`` when the
    system messages plus the latest turn alone exceed it.
    """
    counts = [count(m) for m in messages]
    before = sum(counts)
    unchanged = CompressResult(list(messages), 0, before, before)
    if before <= to_tokens:
        return unchanged
    history = [i for i, m in enumerate(messages) if m.get("role") not in PINNED_ROLES]
    users = [i for i in history if messages[i].get("role") == "user"]
    if not users:
        return unchanged
    latest = users[-1]
    keep = {i for i, m in enumerate(messages) if m.get("role") in PINNED_ROLES or i >= latest}

    # earlier history as turns: each starts at a user message; anything before the first user is one turn
    turns: list[list[int]] = []
    for i in (i for i in history if i < latest):
        if not turns or messages[i].get("role") == "user":
            turns.append([])
        turns[-1].append(i)

    room = to_tokens - sum(counts[i] for i in keep)
    for turn in reversed(turns):
        size = sum(counts[i] for i in turn)
        if size > room:
            break
        keep.update(turn)
        room -= size

    kept = [messages[i] for i in sorted(keep)]
    return CompressResult(kept, len(messages) - len(kept), before, sum(counts[i] for i in keep))
