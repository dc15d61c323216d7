"""The requester side of the certificate service: key generated here, CSR sent, chain back."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from meshway.api.v1 import ca_pb2
from meshway.identity.csr import build_csr, generate_key, key_to_pem
from meshway.identity.spiffe import SpiffeId
from meshway.xds.channel import GrpcChannel
from meshway.xds.client import CONTROL_PLANE_NAME

CREATE_CERTIFICATE = "/meshway.api.v1.CertificateService/CreateCertificate"


@dataclass(frozen=True)
class WorkloadCertificate:
    identity: SpiffeId
    key_pem: bytes
    cert_chain_pem: list[str]
    trust_bundle_pem: list[str]


class CaClient:
    """Talks to the control plane's CertificateService with a node credential."""

    def __init__(self, target: str, token: str, root_certificates: bytes) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._channel = GrpcChannel(
            target, root_certificates=root_certificates, server_name=CONTROL_PLANE_NAME
        )

    async def fetch(
        self, identity: SpiffeId, ttl: timedelta | None = None, rpc_timeout: float = 10.0
    ) -> WorkloadCertificate:
        key = generate_key()
        request = ca_pb2.CertificateRequest(
            csr=build_csr(key, identity).decode(),
            validity_duration_seconds=int(ttl.total_seconds()) if ttl else 0,
        )
        response = await self._channel.unary(
            CREATE_CERTIFICATE,
            request,
            ca_pb2.CertificateResponse,
            metadata=self._metadata,
            timeout=rpc_timeout,
        )
        return WorkloadCertificate(
            identity, key_to_pem(key), list(response.cert_chain), list(response.trust_bundle)
        )

    async def close(self) -> None:
        await self._channel.close()
