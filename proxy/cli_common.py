"""Small helpers shared by the ``guardproxy`` subcommands."""

from __future__ import annotations

import os

DEFAULT_CONFIG = "guardproxy.yaml"


def config_path(arg: str | None) -> str:
    """The config file: ``--config``, else ``$GUARDPROXY_CONFIG``, else ``guardproxy.yaml``."""
    return arg or os.environ.get("GUARDPROXY_CONFIG") or DEFAULT_CONFIG
