"""``POST /v1/feedback`` accepts a verdict only on the caller's own decisions (live server, memory and Redis).

A decision id names the key it was issued to (an HMAC over a nonce and the key id), so an unknown id and
another key's id get the same ``404 decision_not_found``; an admin key may give feedback on any decision,
recorded as ``admin``. One verdict per decision: a second replaces the first, and the override ratio
counts decisions, not posts.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import httpx
import pytest
from conftest import (
    ADMIN_KEY,
    PLAY_KEY,
    SUPPORT_KEY,
    Mock,
    Proxy,
    default_config,
    free_port,
    shipped_policies,
    store_for,
)


@pytest.fixture(scope="module", params=["memory", "redis"])
def gp(request: pytest.FixtureRequest, make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> Proxy:
    store = store_for(request.param)
    return make_proxy(policies=shipped_policies(), config=default_config(mock_upstream.url, free_port(), store))


def _decision(gp: Proxy, mock: Mock, key: str = PLAY_KEY) -> str:
    mock.script({"content": "hello"})
    r = gp.post("/v1/chat/completions", key=key, json={"model": "gpt-4o-mini",
                                                       "messages": [{"role": "user", "content": "hi"}]})
    return r.headers["x-guardproxy-decision-id"]


def _feedback(gp: Proxy, did: str, outcome: str, key: str = PLAY_KEY) -> httpx.Response:
    return gp.post("/v1/feedback", key=key, json={"decision_id": did, "outcome": outcome})


def _metric(gp: Proxy, name: str, outcome: str) -> float:
    for line in gp.get("/metrics", key=None).text.splitlines():
        if line.startswith(f'{name}{{outcome="{outcome}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {outcome}")


def _feedback_lines(gp: Proxy, did: str) -> list[dict[str, object]]:
    return [doc for doc in gp.audit_lines() if doc.get("event") == "feedback" and doc.get("decision_id") == did]


def test_a_caller_gives_feedback_on_its_own_decision(gp: Proxy, mock_upstream: Mock) -> None:
    did = _decision(gp, mock_upstream)
    r = _feedback(gp, did, "overridden")
    assert r.status_code == 200 and r.json()["replaced"] is None
    assert _feedback_lines(gp, did) == [{**_feedback_lines(gp, did)[0], "by": "playground", "key": "playground",
                                         "outcome": "overridden", "previous": None}]


@pytest.mark.parametrize("forged", [
    "dec_" + "0" * 32, "dec_" + os.urandom(16).hex(), "dec_1", "not-a-decision", "dec_" + "z" * 32,
])
def test_unknown_ids_and_other_keys_decisions_get_the_same_404(gp: Proxy, mock_upstream: Mock, forged: str) -> None:
    others = _decision(gp, mock_upstream, key=SUPPORT_KEY)
    before = _metric(gp, "guardproxy_feedback_total", "overridden")
    answers = [_feedback(gp, did, "overridden") for did in (forged, others)]
    assert [a.status_code for a in answers] == [404, 404]
    bodies = [a.json()["error"] for a in answers]
    assert [(b["code"], b["message"], b["param"]) for b in bodies] == [
        ("decision_not_found", "no such decision for this key", "decision_id")] * 2
    assert _metric(gp, "guardproxy_feedback_total", "overridden") == before
    assert _feedback_lines(gp, others) == []


def test_an_admin_may_give_feedback_on_any_decision(gp: Proxy, mock_upstream: Mock) -> None:
    did = _decision(gp, mock_upstream, key=SUPPORT_KEY)
    r = _feedback(gp, did, "confirmed", key=ADMIN_KEY)
    assert r.status_code == 200
    (line,) = _feedback_lines(gp, did)
    assert (line["by"], line["key"]) == ("admin", "support-agent")
    assert _feedback(gp, "dec_" + "0" * 32, "confirmed", key=ADMIN_KEY).status_code == 404


def test_one_verdict_per_decision(gp: Proxy, mock_upstream: Mock) -> None:
    did = _decision(gp, mock_upstream)
    overridden = _metric(gp, "guardproxy_feedback_total", "overridden")
    retracted = _metric(gp, "guardproxy_feedback_retracted_total", "overridden")
    for _ in range(5):  # posting the same verdict again changes nothing
        assert _feedback(gp, did, "overridden").status_code == 200
    assert _metric(gp, "guardproxy_feedback_total", "overridden") == overridden + 1
    r = _feedback(gp, did, "confirmed")
    assert r.status_code == 200 and r.json()["replaced"] == "overridden"
    assert _metric(gp, "guardproxy_feedback_retracted_total", "overridden") == retracted + 1
    assert [line["previous"] for line in _feedback_lines(gp, did)] == [None] + ["overridden"] * 5


def test_feedback_needs_a_key(gp: Proxy, mock_upstream: Mock) -> None:
    did = _decision(gp, mock_upstream)
    r = httpx.post(gp.root + "/v1/feedback", json={"decision_id": did, "outcome": "confirmed"}, timeout=10)
    assert r.status_code == 401
