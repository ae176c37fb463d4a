"""Process plumbing for the benchmarks: start and stop servers, read CPU time and peak RSS from /proc.

CPU is ``utime + stime`` of every thread of the process and of its descendants (uvicorn workers),
read from ``/proc/<pid>/stat``; peak memory is ``VmHWM`` from ``/proc/<pid>/status`` summed over the
same tree. Linux only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
            out.extend(int(c) for c in text.split())
    except OSError:
        pass
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(_children(p))
    return pids


def cpu_seconds(pid: int) -> float:
    """utime + stime (all threads) of the process tree, in seconds."""
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    """Sum of VmHWM over the process tree, MiB."""
    kb = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    kb += int(line.split()[1])
        except OSError:
            continue
    return kb / 1024


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (401 and the like are fine)
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up within {timeout:.0f}s")


@dataclass
class Server:
    """A server process we started (own process group, so workers go with it)."""

    name: str
    proc: subprocess.Popen[bytes]
    root: str  # http://127.0.0.1:PORT
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def start(name: str, cmd: list[str], *, port: int, health: str, logdir: Path, cwd: Path | None = None,
          env: dict[str, str] | None = None, timeout: float = 90.0) -> Server:
    """Run ``cmd`` in its own session, logging to ``logdir/name.log``; wait until ``health`` answers."""
    log = logdir / f"{name}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    root = f"http://127.0.0.1:{port}"
    server = Server(name, proc, root, log)
    try:
        wait_http(root + health, proc, timeout)
    except BaseException as exc:
        server.stop()
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{name} failed to start; see {log}:\n{tail}") from exc
    return server
