"""State stores: budgets, idempotency, approvals and duplicate tool calls.

Pick a backend by URL with :func:`open_store`:

* ``memory``: one process (:class:`MemoryStore`);
* ``redis://`` / ``rediss://``: one Redis;
* ``redis+sentinel://[:pw@]h:p,h2:p/service_name[/db]``: the Sentinel-managed master;
* ``redis+cluster://[:pw@]h:p[,h2:p]``: Redis Cluster (``rediss+...`` for TLS).
"""

from __future__ import annotations

from .base import (
    APPROVAL_STATUSES,
    Approval,
    ApprovalStatus,
    Ceiling,
    Decided,
    IdemBegin,
    IdemState,
    ReserveResult,
    Store,
    StoreUnavailable,
)
from .memory import MemoryStore

__all__ = [
    "APPROVAL_STATUSES",
    "Approval",
    "ApprovalStatus",
    "Ceiling",
    "Decided",
    "IdemBegin",
    "IdemState",
    "MemoryStore",
    "ReserveResult",
    "Store",
    "StoreUnavailable",
    "open_store",
]


def open_store(
    url: str, *, timeout_s: float = 0.25, prefix: str = "gp:", max_entries: int = 1_000_000
) -> Store:
    """The store named by ``url``. Nothing connects until the first call. ``max_entries``
    bounds the memory store (Redis is bounded by its own ``maxmemory``)."""
    if url == "memory":
        return MemoryStore(max_entries=max_entries)
    if url.split("://", 1)[0].lower() in (
        "redis",
        "rediss",
        "redis+sentinel",
        "rediss+sentinel",
        "redis+cluster",
        "rediss+cluster",
    ):
        from .redis import RedisStore  # the memory backend needs no redis import

        return RedisStore.from_url(url, timeout_s=timeout_s, prefix=prefix)
    raise ValueError(f"unknown state store URL scheme in {url.split('://', 1)[0]!r}")
