"""Decision ids that say whose decision they are.

Every request gets a decision id (``dec_`` + 32 hex digits): a random nonce plus an HMAC of the nonce and
the key id it was issued to, under ``server.decision_secret``. So ``/v1/feedback`` can tell, with no
lookup and no state written on the request path, that an id was issued by this deployment and to which
key: a made-up id and another key's id look the same (``404 decision_not_found``), and ids cannot be
probed. Replicas sharing the config share the secret; set it explicitly when the config is not secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable

PREFIX = "dec_"
_NONCE_HEX = 20
_MAC_HEX = 12  # 48 bits: far beyond what online guessing against the proxy can try


class DecisionIds:
    """Issues and verifies decision ids under one secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def from_config(cls, explicit: str | None, material: Iterable[str]) -> DecisionIds:
        """The explicit secret, else one derived from the config's key material (the same on every
        replica that shares the config)."""
        if explicit:
            return cls(explicit.encode("utf-8", "surrogatepass"))
        h = hashlib.sha256(b"guardproxy decision ids v1")
        for item in sorted(material):
            h.update(b"\x00" + item.encode("utf-8", "surrogatepass"))
        return cls(h.digest())

    def _mac(self, nonce: str, key_id: str) -> str:
        msg = nonce.encode() + b"\x00" + key_id.encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()[:_MAC_HEX]

    def issue(self, key_id: str) -> str:
        """A fresh decision id bound to ``key_id``."""
        nonce = os.urandom(_NONCE_HEX // 2).hex()
        return PREFIX + nonce + self._mac(nonce, key_id)

    def issued_to(self, decision_id: str, key_id: str) -> bool:
        """Whether ``decision_id`` was issued by this deployment to ``key_id`` (constant-time compare)."""
        if not decision_id.startswith(PREFIX) or len(decision_id) != len(PREFIX) + _NONCE_HEX + _MAC_HEX:
            return False
        body = decision_id[len(PREFIX):]
        nonce, mac = body[:_NONCE_HEX], body[_NONCE_HEX:]
        return hmac.compare_digest(mac, self._mac(nonce, key_id))

    def owner(self, decision_id: str, key_ids: Iterable[str]) -> str | None:
        """The key (among ``key_ids``) a decision id was issued to, or None (admin feedback)."""
        for key_id in key_ids:
            if self.issued_to(decision_id, key_id):
                return key_id
        return None
