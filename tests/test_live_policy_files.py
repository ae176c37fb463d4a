"""Hostile and broken policy files against the real ``guardproxy serve``: an alias bomb, 600 nesting levels,
20,000 deny globs, a missing or emptied policy folder. The last good set keeps serving, ``/readyz`` and
``/admin/reload`` report a located error, and a failed reload is not retried until the files change.

The proxy runs with its address space capped (as ``tests/test_cli_check.py`` caps ``guardproxy check``), so a
bound that stopped working fails the test instead of exhausting the machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    ADMIN_KEY,
    ALIAS_BOMB,
    PLAY_KEY,
    Mock,
    Proxy,
    cap_memory,
    default_config,
    free_port,
    shipped_policies,
)

POLL_S = 0.2  # the config's watch interval (conftest's default_config)

HEADER = "apiVersion: guardproxy/v1\nkind: Policy\nmetadata: {name: hostile}\nmatch: {all: true}\n"


@pytest.fixture(scope="module")
def start(make_proxy: Callable[..., Proxy]) -> Callable[..., Proxy]:
    """conftest's ``make_proxy`` with the serve process's memory capped."""
    return lambda policies: make_proxy(policies=policies, capped=True)


def put(path: Path, text: str) -> None:
    """Write atomically: the watcher polling mid-write must not see (and count a reload of) half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def ready(p: Proxy) -> dict[str, Any]:
    doc: dict[str, Any] = p.get("/readyz", key=None).json()
    return doc


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20.0
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def reloads(p: Proxy, result: str) -> float:
    text = p.get("/metrics", key=None).text
    m = re.search(rf'^guardproxy_policy_reloads_total{{result="{result}"}} (\S+)$', text, re.M)
    assert m is not None, text
    return float(m.group(1))


def delete_account_stripped(p: Proxy, mock: Mock) -> tuple[bool, str]:
    """Whether org-base still strips ``delete_account`` for the playground key, and the revision that answered."""
    mock.script({"content": "ok"})
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
             for n in ("delete_account", "get_ticket_history")]
    raw = p.client(PLAY_KEY).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], tools=tools)
    assert raw.parse().choices[0].message.content == "ok"
    sent = [t["function"]["name"] for t in mock.calls()[-1]["body"]["tools"]]
    assert "get_ticket_history" in sent
    return "delete_account" not in sent, raw.headers["x-guardproxy-policy-revision"]


def test_alias_bomb_in_a_running_proxy_is_refused_once_and_the_last_good_set_serves(
        start: Callable[..., Proxy], mock_upstream: Mock) -> None:
    p = start(shipped_policies())
    rev = ready(p)["policy_revision"]
    assert delete_account_stripped(p, mock_upstream) == (True, rev)
    bomb = p.dir / "policies" / "bomb.yaml"
    put(bomb, ALIAS_BOMB)
    wait_for(lambda: bool(ready(p)["policy_errors"]), "the bomb to be refused")
    doc = ready(p)
    expected = f"{bomb}:5: the document expands to more than 100000 nodes through aliases (at alias *d)"
    assert doc["status"] == "ready" and doc["policy_revision"] == rev and doc["policy_errors"] == [expected]
    assert delete_account_stripped(p, mock_upstream) == (True, rev)
    assert reloads(p, "error") == 1
    # Ten poll intervals with the files unchanged: the watcher must not build the same failing files again.
    time.sleep(10 * POLL_S)
    assert reloads(p, "error") == 1
    # It is still watching: the same text written again (a new mtime) is one more attempt, and only one.
    put(bomb, ALIAS_BOMB)
    wait_for(lambda: reloads(p, "error") == 2, "the rewritten bomb to be tried")
    failures = [ln for ln in p.output().splitlines() if "policy reload failed" in ln and "bomb.yaml" in ln]
    assert len(failures) == 2, p.output()
    assert "Traceback" not in p.output() and "MemoryError" not in p.output()
    bomb.unlink()
    wait_for(lambda: ready(p)["policy_errors"] == [], "the bomb's removal to clear the error")
    assert ready(p)["policy_revision"] == rev


def test_600_nesting_levels_are_a_422_with_a_located_error_not_a_500(start: Callable[..., Proxy]) -> None:
    p = start(shipped_policies())
    rev = ready(p)["policy_revision"]
    deep = p.dir / "policies" / "deep.yaml"
    put(deep, HEADER + "x: " + "[" * 600 + "]" * 600 + "\n")
    r = p.post("/admin/reload", key=ADMIN_KEY)
    assert r.status_code == 422, r.text
    expected = f"{deep}:5: nesting deeper than 64 levels"
    assert r.json() == {"reloaded": False, "policy_revision": rev, "errors": [expected]}
    assert ready(p)["policy_errors"] == [expected] and ready(p)["policy_revision"] == rev
    assert "Traceback" not in p.output()


def test_twenty_thousand_deny_globs_are_a_422_with_a_located_error(start: Callable[..., Proxy]) -> None:
    p = start(shipped_policies())
    rev = ready(p)["policy_revision"]
    many = p.dir / "policies" / "many.yaml"
    put(many, HEADER + "tools:\n  deny:\n" + "".join(f"    - t{i:06d}_some_long_tool_name_*\n"
                                                          for i in range(20_000)))
    r = p.post("/admin/reload", key=ADMIN_KEY)
    assert r.status_code == 422, r.text
    (err,) = r.json()["errors"]
    assert err.startswith(f"{many}:"), err
    assert r.json()["policy_revision"] == rev
    assert ready(p)["policy_errors"] == [err]
    assert "Traceback" not in p.output()


def test_renaming_the_watched_folder_away_keeps_the_last_good_set(start: Callable[..., Proxy],
                                                                  mock_upstream: Mock) -> None:
    p = start(shipped_policies())
    rev = ready(p)["policy_revision"]
    folder = p.dir / "policies"
    folder.rename(p.dir / "policies.moved")
    wait_for(lambda: bool(ready(p)["policy_errors"]), "the missing folder to be reported")
    doc = ready(p)
    assert doc["policy_errors"] == [f"{folder}: policy path does not exist"]
    assert doc["status"] == "ready" and doc["policy_revision"] == rev
    assert delete_account_stripped(p, mock_upstream) == (True, rev)
    (p.dir / "policies.moved").rename(folder)
    wait_for(lambda: ready(p)["policy_errors"] == [], "the folder's return to clear the error")
    assert ready(p)["policy_revision"] == rev


def test_emptying_the_watched_folder_keeps_the_last_good_set(start: Callable[..., Proxy], mock_upstream: Mock) -> None:
    p = start(shipped_policies())
    rev = ready(p)["policy_revision"]
    folder = p.dir / "policies"
    # Swapped for an empty folder in two renames, so no poll ever sees a set with one policy left.
    (p.dir / "empty").mkdir()
    folder.rename(p.dir / "policies.old")
    (p.dir / "empty").rename(folder)
    r = p.post("/admin/reload", key=ADMIN_KEY)
    assert r.status_code == 422, r.text
    (err,) = r.json()["errors"]
    assert err == (f"{folder}: no policies found; the last good set (2 policies, revision {rev}) keeps serving")
    assert ready(p)["policy_errors"] == [err] and ready(p)["policy_revision"] == rev
    assert delete_account_stripped(p, mock_upstream) == (True, rev)


def test_an_empty_policy_folder_at_start_serves_with_a_warning(start: Callable[..., Proxy]) -> None:
    p = start({})
    doc = ready(p)
    assert doc["status"] == "ready" and doc["policies"] == [] and doc["policy_errors"] == []
    assert f"{p.dir / 'policies'}: warning: no policies: every request is allowed" in p.output()


def test_serve_refuses_to_start_on_a_missing_policy_path(mock_upstream: Mock, tmp_path: Path) -> None:
    cfg = default_config(mock_upstream.url, free_port())
    cfg["policies"] = ["polciies/"]
    (tmp_path / "policies").mkdir()
    shutil.copy(Path(__file__).resolve().parent.parent / "policies" / "org-base.yaml", tmp_path / "policies")
    (tmp_path / "guardproxy.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDPROXY_")}
    result = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(tmp_path / "guardproxy.yaml")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
                            preexec_fn=cap_memory)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{tmp_path / 'polciies'}: policy path does not exist" in result.stderr
