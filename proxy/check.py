"""``guardproxy check``: validate the config and every policy, report every problem found in one run."""

from __future__ import annotations

import argparse

from proxy.cli_common import config_path


def cmd_check(args: argparse.Namespace) -> int:
    from proxy.config import ConfigError, load_config
    from proxy.policy_source import build

    path = config_path(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        for e in exc.errors:
            print(f"error: {e}")
        print(f"{len(exc.errors)} error(s)")
        return 1
    compiled, errors, warnings = build([config.resolve(p) for p in config.policies])
    for w in warnings:
        print(str(w))
    for e in errors:
        print(f"error: {e}")
    problems = list(errors)
    if compiled is not None:
        names = {m.name for m in config.models}
        for cp in compiled.policies:
            for m in cp.policy.models.allow or ():
                if m not in names:
                    print(f"warning: {cp.source}: policy {cp.name} allows model {m!r}, which no route serves")
    if problems:
        print(f"{len(problems)} error(s)")
        return 1
    rev = compiled.revision if compiled else "-"
    print(f"ok: config {path}, {len(compiled.policies) if compiled else 0} policies, revision {rev}")
    return 0
