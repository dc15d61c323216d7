"""One certificate per local identity, fetched by CSR and renewed at half-life.

The key is generated here and never leaves the node. Renewal replaces the credentials used
for *new* connections; established TLS sessions keep running on the old ones, so a rotation
never breaks a transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from meshway.hbone.tls import WorkloadCredentials
from meshway.identity.caclient import CaClient
from meshway.identity.spiffe import SpiffeId
from meshway.telemetry.metrics import NodeMetrics
from meshway.xds.channel import GrpcError

log = logging.getLogger(__name__)


class CertificateManager:
    def __init__(
        self, ca: CaClient, metrics: NodeMetrics, lifetime: timedelta | None = None
    ) -> None:
        self._ca = ca
        self._metrics = metrics
        self._lifetime = lifetime
        self._current: dict[SpiffeId, WorkloadCredentials] = {}
        self._issued_at: dict[SpiffeId, float] = {}
        self._pending: dict[SpiffeId, asyncio.Future[WorkloadCredentials]] = {}
        self._wanted: set[SpiffeId] = set()
        self._changed = asyncio.Event()
        self.failures = 0

    def current(self, identity: SpiffeId) -> WorkloadCredentials | None:
        return self._current.get(identity)

    async def get(self, identity: SpiffeId) -> WorkloadCredentials:
        """The identity's credentials, fetching them first if there are none yet."""
        creds = self._current.get(identity)
        if creds is not None:
            return creds
        pending = self._pending.get(identity)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(identity))
            self._pending[identity] = pending
            pending.add_done_callback(lambda _: self._pending.pop(identity, None))
        return await asyncio.shield(pending)

    async def _fetch(self, identity: SpiffeId) -> WorkloadCredentials:
        try:
            cert = await self._ca.fetch(identity, self._lifetime)
        except GrpcError as exc:
            self.failures += 1
            raise CertificateUnavailable(f"no certificate for {identity.uri}: {exc}") from exc
        creds = WorkloadCredentials.from_pems(
            "".join(cert.cert_chain_pem).encode(),
            cert.key_pem,
            "".join(cert.trust_bundle_pem).encode(),
        )
        self._current[identity] = creds
        self._issued_at[identity] = time.time()
        self._metrics.cert_expiry.labels(identity=identity.uri).set(creds.not_after.timestamp())
        self._changed.set()
        log.info("certificate for %s valid until %s", identity.uri, creds.not_after.isoformat())
        return creds

    def retain(self, identities: Iterable[SpiffeId]) -> None:
        """Keep (and renew) only these identities: the ones of pods on this node."""
        self._wanted = set(identities)
        for identity in [i for i in self._current if i not in self._wanted]:
            self._current.pop(identity)
            self._issued_at.pop(identity, None)
            with contextlib.suppress(KeyError):
                self._metrics.cert_expiry.remove(identity.uri)
        self._changed.set()

    def _renew_at(self, identity: SpiffeId) -> float:
        creds = self._current[identity]
        issued = self._issued_at[identity]
        return issued + (creds.not_after.timestamp() - issued) / 2

    async def run(self) -> None:
        """Renew each certificate at half its lifetime; retry failures with back-off."""
        backoff = 1.0
        while True:
            self._changed.clear()
            due = sorted((self._renew_at(i), i) for i in self._current if i in self._wanted)
            now = time.time()
            ready = [i for at, i in due if at <= now]
            for identity in ready:
                try:
                    await self._fetch(identity)
                    backoff = 1.0
                except CertificateUnavailable as exc:
                    log.warning("renewal failed, retrying in %.0fs: %s", backoff, exc)
                    await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                    backoff = min(backoff * 2, 60.0)
            upcoming = [at for at, i in due if i not in ready]
            wait = max(0.05, min(upcoming) - time.time()) if upcoming else 3600.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)

    def dump(self) -> list[dict[str, object]]:
        now = datetime.now(UTC)
        return [
            {
                "identity": identity.uri,
                "notAfter": creds.not_after.isoformat(),
                "expiresInSeconds": int((creds.not_after - now).total_seconds()),
                "renewAt": datetime.fromtimestamp(self._renew_at(identity), UTC).isoformat(),
            }
            for identity, creds in sorted(self._current.items(), key=lambda kv: kv[0].uri)
        ]


class CertificateUnavailable(Exception):
    pass
