"""Every text a model hands to the agent, whatever field carries it.

Output checks (``output.deny_patterns``) must see all of it: ``content`` (a string or parts of any type
that carry text), ``refusal``, reasoning, ``audio.transcript``, annotations, and whatever a provider adds
next. So the texts of a message (or of a stream delta) are collected by walking it, not by naming
fields; only fields that never carry model text (ids, roles, types, base64 audio ``data``, URLs) and the
tool calls (checked call by call) are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

Path = tuple[str | int, ...]

# Keys whose string values are not model text shown to the agent (or would only make patterns misfire:
# base64 audio, data URLs).
SKIP_KEYS = frozenset({"role", "type", "id", "index", "data", "url", "format", "expires_at", "tool_call_id",
                       "detail", "mime_type", "file_id"})
CALL_KEYS = frozenset({"tool_calls", "function_call"})
_TEXT_PART_KEYS = ("text",)


def strings(node: Any, prefix: Path = ()) -> Iterator[tuple[Path, str]]:
    """(path, text) of every string in ``node`` outside :data:`SKIP_KEYS` and the tool calls."""
    stack: list[tuple[Path, Any]] = [(prefix, node)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if value:
                yield path, value
        elif isinstance(value, dict):
            for k, v in reversed(list(value.items())):
                if k not in SKIP_KEYS and not (not path and k in CALL_KEYS):
                    stack.append(((*path, k), v))
        elif isinstance(value, list):
            for i in range(len(value) - 1, -1, -1):
                stack.append(((*path, i), value[i]))


def message_texts(message: dict[str, Any]) -> tuple[str | None, list[str]]:
    """(the content as one text, every other text) of an assistant message.

    The content is the string ``content``, or the join of the ``text`` of its parts; it is what output
    schemas and rules read. The other texts are everything else the message shows (other string fields of
    the parts, ``refusal``, reasoning, ``audio.transcript``...), for the deny patterns.
    """
    content = message.get("content")
    others: list[str] = []
    if isinstance(content, list):
        texts: list[str] = []
        for i, part in enumerate(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
                rest = {k: v for k, v in part.items() if k != "text"}
            else:
                rest = part
            others.extend(t for _, t in strings(rest, ("content", i)))
        content = "".join(texts)
    elif not isinstance(content, str):
        content = None
    others.extend(t for _, t in strings({k: v for k, v in message.items() if k != "content"}))
    return content, others
