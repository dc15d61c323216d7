"""The requester side of the certificate service: key generated here, CSR sent, chain back."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import grpc

from meshway.api.v1 import ca_pb2, ca_pb2_grpc
from meshway.identity.csr import build_csr, generate_key, key_to_pem
from meshway.identity.spiffe import SpiffeId
from meshway.xds.client import GRPC_OPTIONS


@dataclass(frozen=True)
class WorkloadCertificate:
    identity: SpiffeId
    key_pem: bytes
    cert_chain_pem: list[str]
    trust_bundle_pem: list[str]


class CaClient:
    """Talks to the control plane's CertificateService with a node credential."""

    def __init__(self, target: str, token: str, root_certificates: bytes) -> None:
        self._target = target
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> ca_pb2_grpc.CertificateServiceStub:
        if self._channel is None:
            self._channel = grpc.aio.secure_channel(self._target, self._creds, options=GRPC_OPTIONS)
        return ca_pb2_grpc.CertificateServiceStub(self._channel)

    async def fetch(
        self, identity: SpiffeId, ttl: timedelta | None = None, rpc_timeout: float = 10.0
    ) -> WorkloadCertificate:
        key = generate_key()
        request = ca_pb2.CertificateRequest(
            csr=build_csr(key, identity).decode(),
            validity_duration_seconds=int(ttl.total_seconds()) if ttl else 0,
        )
        response = await self._stub().CreateCertificate(
            request, metadata=self._metadata, timeout=rpc_timeout
        )
        return WorkloadCertificate(
            identity, key_to_pem(key), list(response.cert_chain), list(response.trust_bundle)
        )

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None
