"""A team is ``(org, team)``: same-named teams in two orgs share nothing (live server, memory and Redis).

Counters, spend, metrics and matching all carry the org: when ``support`` in one org exhausts its team
budget, ``support`` in another org is still served.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
import yaml
from conftest import ADMIN_KEY, Mock, Proxy, default_config, free_port, store_for

RUN = uuid.uuid4().hex[:8]
ORG_A, ORG_B = f"orga{RUN}", f"orgb{RUN}"
BUDGET = yaml.safe_dump({"apiVersion": "guardproxy/v1", "kind": "Policy", "metadata": {"name": "team-budget"},
                         "match": {"all": True},
                         "cost": {"budgets": [{"scope": "team", "window": "day", "usd": 0.0005}]}})
KEYS = {"a": "sk-team-a", "b": "sk-team-b"}


@pytest.fixture(scope="module", params=["memory", "redis"])
def gp(request: pytest.FixtureRequest, make_proxy: Callable[..., Proxy], mock_upstream: Mock) -> Proxy:
    store = store_for(request.param)
    cfg = default_config(mock_upstream.url, free_port(), store)
    cfg["keys"] = [{"id": f"team-a-{RUN}", "key": KEYS["a"], "team": "support", "org": ORG_A},
                   {"id": f"team-b-{RUN}", "key": KEYS["b"], "team": "support", "org": ORG_B}]
    return make_proxy(policies={"budget.yaml": BUDGET}, config=cfg)


def _ask(gp: Proxy, who: str, mock: Mock) -> int:
    mock.script({"content": "ok", "usage": {"prompt_tokens": 5, "completion_tokens": 300}})
    r = gp.post("/v1/chat/completions", key=KEYS[who],
                json={"model": "gpt-4o-mini", "max_tokens": 300, "messages": [{"role": "user", "content": "hi"}]})
    return r.status_code


def test_same_named_teams_in_two_orgs_have_separate_budgets(gp: Proxy, mock_upstream: Mock) -> None:
    # 300 x $0.60/M = $0.00018 a request: the $0.0005 team budget admits two, refuses the third
    assert [_ask(gp, "a", mock_upstream) for _ in range(3)] == [200, 200, 429]
    assert _ask(gp, "b", mock_upstream) == 200  # the other org's support team has spent nothing
    rows = gp.get("/v1/spend?prefix=team:", key=ADMIN_KEY).json()["data"]
    counters = {r["counter"].rsplit(":", 2)[0]: r["spend_usd"] for r in rows if RUN in r["counter"]}
    assert set(counters) == {f"team:{ORG_A}/support", f"team:{ORG_B}/support"}


def test_team_metrics_carry_the_org(gp: Proxy, mock_upstream: Mock) -> None:
    _ask(gp, "b", mock_upstream)
    metrics = gp.get("/metrics", key=None).text
    assert f'team="{ORG_B}/support"' in metrics and f'team="{ORG_A}/support"' in metrics
