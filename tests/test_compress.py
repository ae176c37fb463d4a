"""rules/compress.py: whole-turn, deterministic history compression that keeps requests valid."""

from __future__ import annotations

from typing import Any

from rules.compress import CompressResult, compress_messages

Msg = dict[str, Any]


def tok(m: Msg) -> int:
    """Test token model: each message declares its size in a ``t`` field (default 100)."""
    return int(m.get("t", 100))


def user(text: str, t: int = 100) -> Msg:
    return {"role": "user", "content": text, "t": t}


def assistant(text: str, t: int = 100) -> Msg:
    return {"role": "assistant", "content": text, "t": t}


def call(cid: str, t: int = 100) -> Msg:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": cid, "type": "function", "function": {"name": "lookup", "arguments": "{}"}}],
        "t": t,
    }


def result(cid: str, t: int = 100) -> Msg:
    return {"role": "tool", "tool_call_id": cid, "content": "ok", "t": t}


def assert_tool_pairs_intact(messages: list[Msg]) -> None:
    answered: set[str] = set()
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            # a tool result must follow (possibly after other results) the assistant that called it
            j = i - 1
            while messages[j]["role"] == "tool":
                j -= 1
            ids = {c["id"] for c in messages[j].get("tool_calls", [])}
            assert m["tool_call_id"] in ids, f"dangling tool message at {i}"
            answered.add(m["tool_call_id"])
    for m in messages:
        for c in m.get("tool_calls", []):
            assert c["id"] in answered, f"tool call {c['id']} lost its result"


def six_thousand_token_history() -> list[Msg]:
    """System (200) + 9 earlier turns, some with tool calls, + the latest user turn: 6,000 tokens."""
    msgs: list[Msg] = [{"role": "system", "content": "be brief", "t": 200}]
    for n in range(9):
        if n % 3 == 0:
            msgs += [user(f"q{n}", 150), call(f"c{n}", 150), result(f"c{n}", 200), assistant(f"a{n}", 100)]
        else:
            msgs += [user(f"q{n}", 300), assistant(f"a{n}", 300)]
    msgs += [user("latest", 200), call("cz", 100), result("cz", 100)]
    return msgs


def test_six_thousand_tokens_to_three_thousand() -> None:
    msgs = six_thousand_token_history()
    assert sum(tok(m) for m in msgs) == 6_000
    r = compress_messages(msgs, 3_000, tok)
    assert r.tokens_before == 6_000
    assert r.tokens_after <= 3_000
    assert r.tokens_after == sum(tok(m) for m in r.messages)
    assert r.dropped == len(msgs) - len(r.messages) > 0
    assert r.messages[0]["role"] == "system"
    # the latest turn is kept in full, and the kept history starts at a user message
    assert r.messages[-3:] == msgs[-3:]
    assert r.messages[1]["role"] == "user"
    assert_tool_pairs_intact(r.messages)
    # order preserved: the kept messages are a subsequence of the input, same objects
    positions = [next(i for i, m in enumerate(msgs) if m is k) for k in r.messages]
    assert positions == sorted(positions)


def test_newest_turns_kept_first_and_greedy_stops_at_first_misfit() -> None:
    msgs = [
        {"role": "system", "content": "s", "t": 100},
        user("old", 100),
        assistant("old", 100),  # turn 1: 200
        user("big", 500),
        assistant("big", 500),  # turn 2: 1000 (does not fit)
        user("mid", 100),
        assistant("mid", 100),  # turn 3: 200
        user("now", 100),
    ]
    r = compress_messages(msgs, 500, tok)
    # core = system + latest user = 200; turn 3 fits (400); turn 2 does not, so turn 1 is dropped too
    assert [m["content"] for m in r.messages] == ["s", "mid", "mid", "now"]
    assert (r.dropped, r.tokens_before, r.tokens_after) == (4, 1_600, 400)


def test_under_target_is_unchanged() -> None:
    msgs = [user("a"), assistant("b"), user("c")]
    r = compress_messages(msgs, 300, tok)
    assert r == CompressResult(msgs, 0, 300, 300)
    assert r.messages is not msgs  # a new list; the caller's list is never aliased


def test_core_over_target_returns_core_not_empty() -> None:
    msgs = [
        {"role": "developer", "content": "d", "t": 50},
        user("old"),
        assistant("old"),
        user("now", 5_000),
        call("c1"),
        result("c1"),
    ]
    r = compress_messages(msgs, 1_000, tok)
    assert [m["role"] for m in r.messages] == ["developer", "user", "assistant", "tool"]
    assert r.tokens_after == 5_250 > 1_000
    assert_tool_pairs_intact(r.messages)


def test_nothing_earlier_to_drop() -> None:
    msgs = [{"role": "system", "content": "long", "t": 900}, user("now"), assistant("partial")]
    r = compress_messages(msgs, 500, tok)
    assert r.messages == msgs and r.dropped == 0 and r.tokens_after == 1_100


def test_no_user_message_is_left_unchanged() -> None:
    msgs = [{"role": "system", "content": "s"}, call("c1"), result("c1"), assistant("done")]
    r = compress_messages(msgs, 10, tok)
    assert r.messages == msgs and r.dropped == 0


def test_tool_call_unit_is_dropped_or_kept_whole() -> None:
    msgs = [
        user("q1"),
        call("c1", 300),
        result("c1", 300),
        {"role": "tool", "tool_call_id": "c1", "content": "second result", "t": 300},
        user("q2"),
    ]
    r = compress_messages(msgs, 500, tok)
    assert [m["content"] for m in r.messages] == ["q2"]
    assert_tool_pairs_intact(r.messages)
    # 1,100 is the whole history: kept; one token less and the calling turn goes as a whole
    assert compress_messages(msgs, 1_100, tok).messages == msgs
    assert [m["content"] for m in compress_messages(msgs, 1_099, tok).messages] == ["q2"]


def test_system_messages_anywhere_are_kept_and_do_not_split_units() -> None:
    msgs = [
        user("q1"),
        call("c1"),
        {"role": "system", "content": "mid-system", "t": 10},
        result("c1"),
        user("q2"),
    ]
    r = compress_messages(msgs, 250, tok)
    assert [m["content"] for m in r.messages] == ["mid-system", "q2"]
    assert_tool_pairs_intact(r.messages)


def test_leading_turn_before_first_user_and_orphan_tool() -> None:
    msgs = [
        {"role": "tool", "tool_call_id": "gone", "content": "orphan", "t": 100},  # already dangling upstream
        assistant("hello"),
        user("q1"),
        assistant("a1"),
        user("q2"),
    ]
    r = compress_messages(msgs, 300, tok)
    assert [m["content"] for m in r.messages] == ["q1", "a1", "q2"]
    r = compress_messages(msgs, 100, tok)
    assert [m["content"] for m in r.messages] == ["q2"]


def test_legacy_function_call_pairs() -> None:
    fcall = {
        "role": "assistant",
        "content": None,
        "function_call": {"name": "f", "arguments": "{}"},
        "t": 100,
    }
    fres = {"role": "function", "name": "f", "content": "r", "t": 100}
    msgs = [user("q1"), fcall, fres, user("q2", 50), fcall, fres]
    r = compress_messages(msgs, 300, tok)
    assert r.messages == msgs[3:]
    assert r.tokens_after == 250


def test_deterministic() -> None:
    msgs = six_thousand_token_history()
    first = compress_messages(msgs, 2_000, tok)
    assert all(compress_messages(msgs, 2_000, tok) == first for _ in range(5))


def test_callback_called_once_per_message() -> None:
    seen: list[int] = []

    def counting(m: Msg) -> int:
        seen.append(id(m))
        return tok(m)

    msgs = six_thousand_token_history()
    compress_messages(msgs, 3_000, counting)
    assert sorted(seen) == sorted(id(m) for m in msgs)
