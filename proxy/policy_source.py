"""Policy files on disk -> a compiled set, and hot reload.

The shell's half of the policy pipeline: it reads the files (``rules/`` never
does I/O), hands them to the loader and compiler, and keeps the last good
compiled set. The watcher polls file signatures off the request path; a changed
set is compiled in a worker thread and swapped in with one reference
assignment. A broken edit leaves the previous set serving and logs every error
with file and line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from rules.compiler import CompiledPolicySet, compile_policies
from rules.loader import load_policies
from rules.yamlsrc import SourceError

log = logging.getLogger("guardproxy.policies")


def policy_files(paths: Iterable[Path]) -> list[Path]:
    """Every ``*.yaml``/``*.yml`` file named or found directly in a named folder (not ``tests/``)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml") and f.is_file()))
        elif p.exists():
            out.append(p)
    return out


def _signature(files: list[Path]) -> tuple[tuple[str, int, int], ...]:
    sig = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        sig.append((str(f), st.st_mtime_ns, st.st_size))
    return tuple(sig)


def build(paths: Iterable[Path]) -> tuple[CompiledPolicySet | None, list[SourceError], list[SourceError]]:
    """Read, load and compile. Returns (set or None, errors, warnings)."""
    docs = []
    errors: list[SourceError] = []
    for f in policy_files(paths):
        try:
            docs.append((str(f), f.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(SourceError(str(f), None, "", f"cannot read: {exc}"))
    loaded = load_policies(docs)
    errors.extend(loaded.errors)
    # Compile the files that did load even when others did not, so one run reports every problem.
    compiled, cerrors = compile_policies(loaded.policies)
    errors.extend(cerrors)
    if errors or compiled is None:
        return None, errors, []
    return compiled, [], list(compiled.warnings)


class PolicyHolder:
    """Holds the compiled set in force; swapping it is one assignment."""

    def __init__(self, paths: list[Path], on_reload: Callable[[str, str], None] | None = None) -> None:
        self.paths = paths
        self.current: CompiledPolicySet | None = None
        self.last_errors: list[SourceError] = []
        self._signature: tuple[tuple[str, int, int], ...] = ()
        self._on_reload = on_reload

    def load_initial(self) -> list[SourceError]:
        compiled, errors, warnings = build(self.paths)
        for w in warnings:
            log.warning("%s", w)
        self._signature = _signature(policy_files(self.paths))
        if compiled is not None:
            self.current = compiled
        self.last_errors = errors
        return errors

    async def reload(self) -> tuple[bool, list[SourceError]]:
        """Rebuild off the event loop; swap only if the new set compiles."""
        files = policy_files(self.paths)
        sig = _signature(files)
        compiled, errors, warnings = await asyncio.to_thread(build, self.paths)
        self._signature = sig
        self.last_errors = errors
        if compiled is None:
            for e in errors:
                log.error("policy reload failed: %s", e)
            if self._on_reload:
                self._on_reload("error", self.current.revision if self.current else "")
            return False, errors
        for w in warnings:
            log.warning("%s", w)
        changed = self.current is None or compiled.revision != self.current.revision
        self.current = compiled
        if changed:
            log.info("policies reloaded: revision %s", compiled.revision)
        if self._on_reload:
            self._on_reload("ok", compiled.revision)
        return True, []

    async def watch(self, interval_s: float) -> None:
        """Poll file signatures; reload when anything changed."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                if _signature(policy_files(self.paths)) != self._signature:
                    await self.reload()
            except Exception:  # the watcher must never die: log and keep the last good set
                log.exception("policy watcher error")
