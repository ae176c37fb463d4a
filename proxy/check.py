"""``guardproxy check``: validate the config and every policy, report every problem found in one run.

One line per problem: ``error: <file>:<line>: [<key>] <message>`` or
``<file>:<line>: [<key>] warning: <message>``, then ``N error(s)`` (exit 1) or an
``ok:`` line (exit 0). A broken config does not hide the policies' errors when
its ``policies:`` list can still be read. Warnings name what can never apply:
a ``match.keys`` id or ``match.teams`` team that no configured key has, a
model no route serves, an empty policy set. ``--strict`` turns every warning
into an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.cli_common import config_path
from rules.effective import team_ref
from rules.yamlsrc import Path as KeyPath
from rules.yamlsrc import SourceError, YamlLoadError, format_path, load_yaml

if TYPE_CHECKING:
    from proxy.config import Config
    from rules.loader import LoadedPolicy


def _policy_paths_of_broken_config(path: str, errors: Sequence[SourceError]) -> list[Path] | None:
    """The configured policy paths of a config that failed validation, when its ``policies:`` is fine."""
    from proxy.config import Config

    if any(e.path == "policies" or e.path.startswith("policies[") for e in errors):
        return None
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    try:
        data = load_yaml(text, str(p), env=os.environ).data
    except YamlLoadError as exc:
        data = exc.located.data if exc.located is not None else None
    if not isinstance(data, dict):
        return None
    raw = data.get("policies", Config.model_fields["policies"].default)
    if not isinstance(raw, list | tuple) or not all(isinstance(x, str) for x in raw):
        return None
    base = p.resolve().parent  # as Config.resolve: relative to the config file's folder
    return [Path(x) if Path(x).is_absolute() else base / x for x in raw]


def _warning(lp: LoadedPolicy, path: KeyPath, message: str) -> SourceError:
    return SourceError(lp.located.source, lp.located.line_of(path), format_path(path), message, "warning")


def _reference_warnings(config: Config, loaded: Sequence[LoadedPolicy]) -> list[SourceError]:
    """Entries of ``match`` and ``models.allow`` that name nothing the config has."""
    ids = {k.id for k in config.keys}
    teams = {(k.org, k.team) for k in config.keys if k.team}
    routes = {m.name for m in config.models}
    out: list[SourceError] = []
    for lp in loaded:
        policy = lp.policy
        for i, key in enumerate(policy.match.keys):
            if key not in ids:
                out.append(_warning(lp, ("match", "keys", i), f"key id {key!r} is not configured (no keys[].id); "
                                                              "this entry matches no caller"))
        for i, entry in enumerate(policy.match.teams):
            org, team = team_ref(entry)
            if org and team and (org, team) not in teams:  # an empty part is the compiler's error
                out.append(_warning(lp, ("match", "teams", i), f"team {entry!r} is not configured (no key has team "
                                    f"{team!r} in org {org!r}); this entry matches no caller"))
        for i, model in enumerate(policy.models.allow or ()):
            if model not in routes:
                out.append(_warning(lp, ("models", "allow", i),
                                    f"model {model!r} is not served by any route (models[].name)"))
    return out


def cmd_check(args: argparse.Namespace) -> int:
    from proxy.config import ConfigError, load_config
    from proxy.policy_source import build_report

    strict = bool(getattr(args, "strict", False))
    path = config_path(args.config)
    errors: list[SourceError] = []
    config = None
    try:
        config = load_config(path)
        policy_paths: list[Path] | None = [config.resolve(p) for p in config.policies]
    except ConfigError as exc:
        errors.extend(exc.errors)
        policy_paths = _policy_paths_of_broken_config(path, exc.errors)
    report = build_report(policy_paths) if policy_paths is not None else None
    warnings: list[SourceError] = []
    if report is not None:
        errors.extend(report.errors)
        warnings.extend(report.warnings)
        if config is not None:
            warnings.extend(_reference_warnings(config, report.loaded))
    if strict:
        errors.extend(dataclasses.replace(w, severity="error") for w in warnings)
        warnings = []
    for e in errors:
        print(f"error: {e}")
    for w in warnings:
        print(str(w))
    if errors or report is None or report.compiled is None:
        print(f"{len(errors)} error(s)")
        return 1
    compiled = report.compiled
    tail = f", {len(warnings)} warning(s)" if warnings else ""
    print(f"ok: config {path}, {len(compiled.policies)} policies, revision {compiled.revision}{tail}")
    return 0
