"""Build a ``redis.asyncio`` client from a state-store URL (standalone, Sentinel, Cluster).

Every client gets ``socket_timeout`` = ``socket_connect_timeout`` = ``timeout_s`` and
``retries`` retries with a short exponential backoff; the client reconnects a
broken connection on the retry, so the first call after Redis comes back works.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff

BLOCKING_POOL_SIZE = 128
BURST_POOL_SIZE = 2048
SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")


@dataclass(frozen=True)
class Connection:
    client: Any  # redis.asyncio.Redis or RedisCluster: the same command surface for our use
    mode: str  # standalone | sentinel | cluster
    target: str  # redacted URL, safe to log
    closers: tuple[Callable[[], Awaitable[Any]], ...] = ()


def backoff(timeout_s: float) -> ExponentialBackoff:
    """Retry pause: a tenth of the timeout doubling per failure, at most half of it."""
    return ExponentialBackoff(cap=timeout_s / 2, base=timeout_s / 10)


def redact(url: str) -> str:
    """``url`` without userinfo or query (either may carry a password)."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{hosts}{parts.path}"


def connect(url: str, *, timeout_s: float, retries: int, pool_wait_s: float) -> Connection:
    """A lazily connecting client for ``url``: nothing touches the network here."""
    conn: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(backoff(timeout_s), retries),
    }
    scheme = url.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise ValueError(f"unsupported state store scheme {scheme!r}")
    if scheme in ("redis", "rediss"):
        # A blocking pool queues a burst for a free connection; the default pool fails a call outright
        # once 100 connections are out, which would read as an outage under load.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=BLOCKING_POOL_SIZE, timeout=pool_wait_s, **conn
        )
        return Connection(aioredis.Redis(connection_pool=pool), "standalone", redact(url))
    # Sentinel and Cluster pools do not block when full: give them room for a large burst.
    conn["max_connections"] = BURST_POOL_SIZE
    parts = urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    conn.update(username=unquote(user) or None, password=unquote(password) or None)
    if scheme.startswith("rediss"):
        conn["ssl"] = True
    hosts = [_host_port(h, 26379 if "sentinel" in scheme else 6379) for h in hostlist.split(",") if h]
    if not hosts:
        raise ValueError("state store URL names no host")
    if scheme.endswith("cluster"):
        cluster = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in hosts], **conn)
        return Connection(cluster, "cluster", redact(url))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("sentinel URL needs a service name: redis+sentinel://h:p/service/db")
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    query = parse_qs(parts.query)
    if "sentinel_password" in query:
        sentinel_kwargs["password"] = query["sentinel_password"][0]
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, **conn)  # type: ignore[no-untyped-call]
    master = sentinel.master_for(path[0], db=int(path[1]) if len(path) > 1 else 0)
    return Connection(master, "sentinel", redact(url), tuple(s.aclose for s in sentinel.sentinels))


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    if item.startswith("["):  # [ipv6]:port
        host, _, rest = item[1:].partition("]")
        return host, int(rest.lstrip(":") or default_port)
    host, _, port = item.partition(":")
    return host, int(port or default_port)
