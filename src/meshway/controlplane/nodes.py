"""Per-node credentials: issued at join time, checked on every xDS stream and CSR.

A credential is `mwn1.<node>.<secret>`; the control plane keeps only a SHA-256 of the secret,
so a copy of the state directory does not let anyone impersonate a node.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from meshway.config.store import SqliteStore

PREFIX = "mwn1"


class CredentialError(Exception):
    pass


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class NodeCredentials:
    def __init__(self, store: SqliteStore) -> None:
        self._store = store

    def issue(self, node: str) -> str:
        """A new credential for `node`; any earlier one stops working."""
        secret = secrets.token_urlsafe(32)
        self._store.put_setting(f"node-credential/{node}", _digest(secret))
        return f"{PREFIX}.{node}.{secret}"

    def revoke(self, node: str) -> None:
        self._store.put_setting(f"node-credential/{node}", "")

    def authenticate(self, token: str) -> str:
        """The node name the token belongs to, or CredentialError."""
        prefix, _, rest = token.partition(".")
        node, _, secret = rest.rpartition(".")
        if prefix != PREFIX or not node or not secret:
            raise CredentialError("malformed node credential")
        expected = self._store.get_setting(f"node-credential/{node}")
        if not expected or not hmac.compare_digest(expected, _digest(secret)):
            raise CredentialError(f"invalid or revoked credential for node '{node}'")
        return node

    def nodes(self) -> list[str]:
        return sorted(
            key.removeprefix("node-credential/")
            for key, value in self._store.settings("node-credential/")
            if value
        )
