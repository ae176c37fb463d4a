"""Proxy keys -> principals. Identity comes only from ``Authorization: Bearer <key>``.

Keys are kept only as SHA-256 digests (config may give ``key_sha256`` directly).
Nothing the caller writes in headers or the body (``user``, ``x-team``, ...)
changes who they are.

Proxy keys are found by a dict lookup on the digest of the presented key, O(1)
however many keys are configured. Its timing tells a caller nothing about any
key: the lookup compares bytes only when the 64-bit hash of the presented
digest equals a stored one's (in practice: the digests are equal, the key is
right), and which table slots it probes depends on Python's per-process keyed
hash of a SHA-256 digest, not on the key's bytes. A caller steers only what goes
*into* SHA-256, so even a perfect measurement brings them no closer to a key
whose digest is configured. Admin keys, few, are checked with
:func:`hmac.compare_digest` against every configured digest.
"""

from __future__ import annotations

import hashlib
import hmac

from proxy.config import Config
from proxy.errors import ProxyError
from rules.evaluate import Principal


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """Resolves presented keys to principals; also knows the admin keys."""

    def __init__(self, config: Config) -> None:
        self._keys: dict[bytes, Principal] = {
            bytes.fromhex(k.digest()): Principal(k.id, k.team, k.org) for k in config.keys
        }
        self._admin = [_digest(k.get_secret_value()) for k in config.admin_keys]

    @staticmethod
    def bearer(authorization: str | None) -> str | None:
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return token.strip()

    def principal(self, authorization: str | None) -> Principal:
        """The caller's principal, or 401 ``invalid_api_key``."""
        token = self.bearer(authorization)
        if token is None:
            raise ProxyError("invalid_api_key", "Missing API key: send Authorization: Bearer <proxy key>.")
        d = _digest(token)
        found = self._keys.get(d)
        if found is None:
            raise ProxyError("invalid_api_key", "Incorrect API key provided.")
        return found

    def is_admin(self, authorization: str | None) -> bool:
        token = self.bearer(authorization)
        if token is None:
            return False
        d = _digest(token)
        ok = False
        for admin in self._admin:
            ok |= hmac.compare_digest(d, admin)
        return ok

    def require_admin(self, authorization: str | None) -> None:
        if not self.is_admin(authorization):
            if self.bearer(authorization) is None:
                raise ProxyError("invalid_api_key", "Missing admin key.")
            raise ProxyError("admin_required", "This endpoint needs an admin key.")
