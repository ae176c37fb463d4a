"""A 7 MB prompt is served, and nobody else waits for it (live server).

Counting its tokens takes a second or more of CPU; it happens off the event loop, so ``/healthz`` and other
requests answer while it is in flight.
"""

from __future__ import annotations

import random
import string
import threading
from collections.abc import Callable

import httpx
import yaml
from conftest import Mock, Proxy, default_config, free_port

KEY = "sk-large"
POLICY = yaml.safe_dump({"apiVersion": "guardproxy/v1", "kind": "Policy", "metadata": {"name": "large"},
                         "match": {"all": True}})


def test_a_7mb_prompt_is_served_while_others_are_answered(make_proxy: Callable[..., Proxy],
                                                         mock_upstream: Mock) -> None:
    cfg = default_config(mock_upstream.url, free_port())
    cfg["keys"] = [{"id": "large", "key": KEY}]
    gp = make_proxy(policies={"large.yaml": POLICY}, config=cfg)
    rng = random.Random(7)
    text = "".join(rng.choices(string.ascii_letters + string.digits + "  .,", k=7_000_000))
    result: dict[str, httpx.Response] = {}

    def big() -> None:
        result["r"] = httpx.post(gp.url + "/chat/completions", timeout=120, headers={"authorization": f"Bearer {KEY}"},
                                 json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})

    mock_upstream.reset()
    worker = threading.Thread(target=big)
    worker.start()
    answered_meanwhile = 0
    chat_meanwhile = 0
    with httpx.Client(timeout=30) as client:
        while worker.is_alive():
            if client.get(gp.root + "/healthz").status_code == 200 and worker.is_alive():
                answered_meanwhile += 1
            if chat_meanwhile < 3:
                r = client.post(gp.url + "/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "small"}]})
                if r.status_code == 200 and worker.is_alive():
                    chat_meanwhile += 1
    worker.join()
    assert result["r"].status_code == 200, result["r"].text[:300]
    assert int(result["r"].headers["x-guardproxy-cost-usd"].replace(".", "")) > 0
    # the big request was still in flight while these were answered
    assert answered_meanwhile >= 3 and chat_meanwhile >= 1
