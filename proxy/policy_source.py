"""Policy files on disk -> a compiled set, and hot reload.

The shell's half of the policy pipeline: it reads the files (``rules/`` never
does I/O), hands them to the loader and compiler, and keeps the last good
compiled set. The watcher polls file signatures off the request path; a changed
set is compiled in a worker thread and swapped in with one reference
assignment. A broken edit leaves the previous set serving and logs every error
with file and line.

Whatever goes wrong with one file (invalid YAML, a hostile document, a crash
inside the loader or compiler) is a located error for that file, never an
exception out of :func:`build`. A configured path that does not exist is an
error; so is a reload that finds no policies at all while the set in force has
some (a renamed or emptied folder must not silently allow everything). A failed
reload records the signature it failed on, so the watcher tries the same files
once, not on every poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rules.compiler import CompiledPolicySet, compile_policies
from rules.loader import LoadedPolicy, load_policies
from rules.precheck import precheck
from rules.yamlsrc import SourceError, size_error

log = logging.getLogger("guardproxy.policies")

Signature = tuple[tuple[str, int, int], ...]
NO_POLICIES = "no policies: every request is allowed"


def policy_files(paths: Iterable[Path]) -> list[Path]:
    """Every ``*.yaml``/``*.yml`` file named or found directly in a named folder (not ``tests/``)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml") and f.is_file()))
        elif p.exists():
            out.append(p)
    return out


def _signature(paths: Iterable[Path]) -> Signature:
    """What the watcher compares: each configured path's presence, then each file's mtime and size."""
    paths = list(paths)
    sig = [(str(p), int(p.exists()), -1) for p in paths]
    for f in policy_files(paths):
        try:
            st = f.stat()
        except OSError:
            continue
        sig.append((str(f), st.st_mtime_ns, st.st_size))
    return tuple(sig)


def _label(paths: Sequence[Path]) -> str:
    return ", ".join(str(p) for p in paths) or "policies"


def _crash(source: str, exc: BaseException) -> SourceError:
    first = (str(exc).splitlines() or [""])[0]
    what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return SourceError(source, None, "", f"cannot compile: {what}")


@dataclass
class BuildResult:
    """One build of the configured paths: the set (None on any error), errors, warnings, what loaded."""

    compiled: CompiledPolicySet | None
    errors: list[SourceError] = field(default_factory=list)
    warnings: list[SourceError] = field(default_factory=list)
    loaded: list[LoadedPolicy] = field(default_factory=list)


def _read(paths: Sequence[Path], errors: list[SourceError]) -> list[tuple[str, str]]:
    docs = []
    for p in paths:
        if not p.exists():
            errors.append(SourceError(str(p), None, "", "policy path does not exist"))
    for f in policy_files(paths):
        try:
            too_big = size_error(str(f), f.stat().st_size)
            if too_big is not None:  # refused before reading: the size on disk is enough
                errors.append(too_big)
                continue
            docs.append((str(f), f.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(SourceError(str(f), None, "", f"cannot read: {exc}"))
    return docs


def _compile(loaded: list[LoadedPolicy], label: str) -> tuple[CompiledPolicySet | None, list[SourceError]]:
    """Compile; an exception is pinned on the file that raises it (compiled alone), else on the set."""
    try:
        return compile_policies(loaded)
    except Exception as exc:  # a crash in the compiler must be a located error, never a 500 or a dead watcher
        errors, pinned = [], False
        for lp in loaded:
            try:
                _, errs = compile_policies([lp])
            except Exception as one:
                errs, pinned = [_crash(lp.located.source, one)], True
            errors.extend(errs)
        return None, errors if pinned else [*errors, _crash(label, exc)]


def build_report(paths: Sequence[Path]) -> BuildResult:
    """Read, load and compile every configured path; every problem is a located error in one list."""
    paths = list(paths)
    errors: list[SourceError] = []
    docs = _read(paths, errors)
    loaded = load_policies(docs)
    errors.extend(loaded.errors)
    for located in loaded.rejected:
        # Not compiled below: compile what can be found in it, so its CEL/regex/schema errors show up too.
        try:
            errors.extend(precheck(located, loaded.errors))
        except Exception as exc:
            errors.append(_crash(located.source, exc))
    # Compile the files that did load even when others did not, so one run reports every problem.
    compiled, cerrors = _compile(loaded.policies, _label(paths))
    errors.extend(cerrors)
    if errors or compiled is None:
        return BuildResult(None, errors, [], loaded.policies)
    warnings = list(compiled.warnings)
    if not compiled.policies:
        warnings.append(SourceError(_label(paths), None, "", NO_POLICIES, "warning"))
    return BuildResult(compiled, [], warnings, loaded.policies)


def build(paths: Iterable[Path]) -> tuple[CompiledPolicySet | None, list[SourceError], list[SourceError]]:
    """Read, load and compile. Returns (set or None, errors, warnings)."""
    r = build_report(list(paths))
    return r.compiled, r.errors, r.warnings


class PolicyHolder:
    """Holds the compiled set in force; swapping it is one assignment."""

    def __init__(self, paths: list[Path], on_reload: Callable[[str, str], None] | None = None) -> None:
        self.paths = paths
        self.current: CompiledPolicySet | None = None
        self.last_errors: list[SourceError] = []
        self._signature: Signature = ()
        self._on_reload = on_reload

    def load_initial(self) -> list[SourceError]:
        self._signature = _signature(self.paths)
        compiled, errors, warnings = build(self.paths)
        for w in warnings:
            log.warning("%s", w)
        if compiled is not None:
            self.current = compiled
        self.last_errors = errors
        return errors

    def _emptied(self, compiled: CompiledPolicySet) -> list[SourceError]:
        """An error when ``compiled`` has no policies but the set in force has some."""
        if compiled.policies or self.current is None or not self.current.policies:
            return []
        n, rev = len(self.current.policies), self.current.revision
        return [SourceError(_label(self.paths), None, "",
                            f"no policies found; the last good set ({n} policies, revision {rev}) keeps serving")]

    async def reload(self) -> tuple[bool, list[SourceError]]:
        """Rebuild off the event loop; swap only if the new set compiles (and is not empty when the old one
        was not)."""
        # Recorded before building: whatever happens below, these files are not tried again until they change.
        self._signature = _signature(self.paths)
        try:
            compiled, errors, warnings = await asyncio.to_thread(build, self.paths)
        except Exception as exc:  # build does not raise; this keeps a reload from ever being a 500
            log.exception("policy build failed")
            compiled, errors, warnings = None, [_crash(_label(self.paths), exc)], []
        if compiled is not None:
            errors = self._emptied(compiled)
            if errors:
                compiled = None
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
                if _signature(self.paths) != self._signature:
                    await self.reload()
            except Exception:  # the watcher must never die: log and keep the last good set
                log.exception("policy watcher error")
