"""The ``guardproxy`` command: serve, check, test, mock-upstream, spend, approvals."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import socket
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from proxy.check import cmd_check
from proxy.cli_common import config_path as _config_path


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _start_mock_thread(host: str) -> str:
    """The built-in scripted model, on its own loop in a daemon thread."""
    from proxy.mock_upstream import start

    port = _free_port(host)
    ready = threading.Event()

    def run() -> None:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(start(host, port))
        ready.set()
        loop.run_forever()

    threading.Thread(target=run, name="mock-upstream", daemon=True).start()
    ready.wait(10)
    return f"http://{host}:{port}/v1"


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from proxy.app import _needs_mock, build_state, create_app
    from proxy.config import ConfigError, load_config
    from proxy.fastpath import FastPath
    from proxy.httpserver import http_protocol

    logging.basicConfig(level=os.environ.get("GUARDPROXY_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(_config_path(args.config))
    except ConfigError as exc:
        print(f"guardproxy: invalid config\n{exc}", file=sys.stderr)
        return 1
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    workers = args.workers or config.server.workers
    if workers > 1 and config.store == "memory":
        print("guardproxy: --workers > 1 needs a shared store (store: redis://...): with the in-memory store each "
              "worker would count budgets, idempotency keys and approvals on its own", file=sys.stderr)
        return 2
    # Our protocol (JSON envelope for the server's own answers, request deadline); no WebSockets served.
    http = http_protocol(config.server.body_read_timeout_s)
    if workers > 1:
        os.environ["GUARDPROXY_CONFIG"] = str(Path(_config_path(args.config)).resolve())
        uvicorn.run("proxy.cli:worker_app", factory=True, host=host, port=port, workers=workers,
                    loop="uvloop", http=http, ws="none", log_level="warning", access_log=False,
                    timeout_graceful_shutdown=5)
        return 0
    mock_base = _start_mock_thread("127.0.0.1") if _needs_mock(config) else None
    try:
        app = create_app(config, state=build_state(config, mock_base=mock_base))
    except RuntimeError as exc:
        print(f"guardproxy: {exc}", file=sys.stderr)
        return 1
    logging.getLogger("guardproxy").info("guardproxy listening on http://%s:%s", host, port)
    # Start-up objects (config, compiled policies, tokenizer tables, imported modules) live forever: move
    # them out of the collector's sight so collections under load stop re-scanning them (~10% CPU/request).
    gc.freeze()
    uvicorn.run(FastPath(app), host=host, port=port, loop="uvloop", http=http, ws="none", log_level="warning",
                access_log=False, timeout_graceful_shutdown=5)
    return 0


def worker_app() -> Any:
    """Factory for ``--workers N`` (each worker builds its own app from the config file)."""
    from proxy.app import _needs_mock, build_state, create_app
    from proxy.config import load_config
    from proxy.fastpath import FastPath

    config = load_config(os.environ["GUARDPROXY_CONFIG"])
    # as in single-process serve: keyless OpenAI routes go to a built-in scripted model (one per worker)
    mock_base = _start_mock_thread("127.0.0.1") if _needs_mock(config) else None
    app = create_app(config, state=build_state(config, mock_base=mock_base))
    gc.freeze()  # as in cmd_serve
    return FastPath(app)


def cmd_test(args: argparse.Namespace) -> int:
    from proxy.policy_tests import run_policy_tests

    return run_policy_tests(args.dir, args.policies, verbose=args.verbose)


def cmd_mock(args: argparse.Namespace) -> int:
    from proxy.mock_upstream import run

    run(args.host, args.port)
    return 0


def _admin_call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    url = args.url.rstrip("/") + path
    key = args.admin_key or os.environ.get("GUARDPROXY_ADMIN_KEY", "sk-admin-dev")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        raise SystemExit(f"guardproxy: {method} {path} failed with HTTP {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise SystemExit(f"guardproxy: cannot reach {url}: {exc.reason}") from None


def cmd_spend(args: argparse.Namespace) -> int:
    doc = _admin_call(args, "GET", "/v1/spend")
    rows = doc.get("data", [])
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'SCOPE':<14}{'COUNTER':<60}{'SPEND USD':>14}")
    for r in rows:
        print(f"{r['scope']:<14}{r['counter']:<60}{r['spend_usd']:>14}")
    return 0


def cmd_approvals(args: argparse.Namespace) -> int:
    if args.action == "list":
        doc = _admin_call(args, "GET", f"/admin/approvals?status={args.status}" if args.status else "/admin/approvals")
        for a in doc.get("data", []):
            print(f"{a['id']}  {a['status']:<9} {a['tool']:<24} {a['principal']:<16} {a['rule_id']}  {a['reason']}")
        return 0
    if not args.id:
        raise SystemExit("guardproxy: approvals approve|reject needs an approval id")
    doc = _admin_call(args, "POST", f"/admin/approvals/{args.id}/{args.action}", {"note": args.note})
    print(f"{doc['id']} {doc['status']}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="guardproxy", description="Policy-as-code guardrail proxy for LLM agents")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("--config")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int)
    s.set_defaults(fn=cmd_serve)
    c = sub.add_parser("check", help="validate config and policies; exit 1 on any error")
    c.add_argument("--config")
    c.add_argument("--strict", action="store_true", help="treat warnings as errors (exit 1)")
    c.set_defaults(fn=cmd_check)
    t = sub.add_parser("test", help="run policy test cases (YAML)")
    t.add_argument("dir", nargs="?", default="policies/tests")
    t.add_argument("--policies", default=None, help="policy folder (default: the folder above DIR)")
    t.add_argument("-v", "--verbose", action="store_true")
    t.set_defaults(fn=cmd_test)
    m = sub.add_parser("mock-upstream", help="a scripted OpenAI-compatible model (not a real LLM)")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=9009)
    m.set_defaults(fn=cmd_mock)
    for name, fn in (("spend", cmd_spend), ("approvals", cmd_approvals)):
        a = sub.add_parser(name)
        a.add_argument("--url", default=os.environ.get("GUARDPROXY_URL", "http://127.0.0.1:8080"))
        a.add_argument("--admin-key")
        if name == "spend":
            a.add_argument("--json", action="store_true")
        else:
            a.add_argument("action", choices=["list", "approve", "reject"])
            a.add_argument("id", nargs="?")
            a.add_argument("--status", default=None)
            a.add_argument("--note", default=None)
        a.set_defaults(fn=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code = args.fn(args)
    return int(code)


if __name__ == "__main__":
    raise SystemExit(main())
