"""py-spy under load: record the proxy process while wrk runs, then rank frames.

``py-spy record --format raw`` writes one ``frame;frame;...;leaf COUNT`` line per unique stack; we
aggregate self time (leaf frames) and inclusive time (any frame on the stack, counted once per
stack), keeping only the project's own modules in the inclusive view so the hot spots are actionable.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
import threading
from pathlib import Path

OWN = ("proxy/", "rules/", "otel/")


def _pyspy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def record(pid: int, seconds: int, out: Path, load: threading.Thread) -> str | None:
    """Sample ``pid`` for ``seconds`` while ``load`` (already started) runs; returns a report or None."""
    exe = _pyspy()
    if exe is None:
        return None
    raw = out.with_suffix(".raw")
    subprocess.run([exe, "record", "-p", str(pid), "-d", str(seconds), "-r", "250", "-f", "raw", "-o", str(raw),
                    "--nonblocking"], capture_output=True, check=False)
    load.join()
    if not raw.exists():
        return None
    return summarize(raw)


def summarize(raw: Path, top: int = 25) -> str:
    total = 0
    self_: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        self_[frames[-1]] += n
        for f in set(frames):
            if any(o in f for o in OWN):
                incl[f] += n
    lines = [f"{total} samples", "", "self time (leaf frames), all modules:"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in self_.most_common(top)]
    lines += ["", "inclusive time, guardproxy modules (proxy/, rules/, otel/):"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top * 2)]
    return "\n".join(lines)
