"""Audit log: one JSON line per decision, to stdout or an append-only file.

The caller builds the event (decision id, trace/span ids, policy revision, rule ids, actions...)
from the same values it puts on the span; this module only stamps the time and writes. Nothing
here reads request bodies, so message content appears only if the caller puts it in the event.

A file is opened ``O_APPEND`` and unbuffered, and each line goes out in a single ``write()``:
that is line buffering without the text layer, and it keeps lines from several proxy workers
sharing one file from interleaving. One small write per decision is a sub-millisecond syscall,
acceptable on the event loop; a slow disk shows up as latency, not as lost lines.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import IO, Any

import orjson

# Lower-case names, plus substrings that mark a header as credential-bearing.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
SECRET_MARKERS = ("api-key", "api_key", "apikey", "token", "secret", "password")


def redact(headers: Mapping[str, str]) -> dict[str, str]:
    """Copy of ``headers`` without credentials (authorization, *api-key*, cookies, tokens)."""
    kept: dict[str, str] = {}
    for name, value in headers.items():
        low = name.lower()
        if low in SECRET_HEADERS or any(marker in low for marker in SECRET_MARKERS):
            continue
        kept[name] = value
    return kept


def rfc3339_ms(moment: datetime) -> str:
    """``2024-05-01T12:00:00.123Z``; naive datetimes are taken as UTC."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class AuditLog:
    """``AuditLog(None)`` or ``AuditLog("-")`` writes to stdout; a path is appended to."""

    def __init__(self, path: str | None, *, clock: Callable[[], datetime] | None = None) -> None:
        self.path = path
        self._clock = clock or (lambda: datetime.now(UTC))
        self._file: IO[bytes] | None = None
        self._stdout: IO[str] | None = None
        if path is None or path == "-":
            self._stdout = sys.stdout
        else:
            self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - lives until close()

    def record(self, event: Mapping[str, Any]) -> None:
        """Write ``{"time": ..., **event}`` as one line. Raises OSError if the write fails, so the
        caller can count it (``Metrics.store_error("audit")``) or fail closed."""
        line = orjson.dumps(
            {"time": rfc3339_ms(self._clock()), **event},
            option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS,
            default=str,
        )
        if self._file is not None:
            view = memoryview(line)
            while view:  # a regular file rarely writes short, but never drop the tail of a line
                written = self._file.write(view)
                view = view[written or 0 :]
        elif self._stdout is not None:
            self._stdout.write(line.decode())
            self._stdout.flush()
        else:
            raise ValueError("audit log is closed")

    def close(self) -> None:
        """Close the file (stdout is left open). Idempotent."""
        file, self._file, self._stdout = self._file, None, None
        if file is not None:
            file.close()


__all__ = ["SECRET_HEADERS", "SECRET_MARKERS", "AuditLog", "redact", "rfc3339_ms"]
