"""Workload identity: SPIFFE IDs, trust bundles, CSRs and the certificate authority."""

from meshway.identity.bundle import TrustBundle
from meshway.identity.ca import (
    CaError,
    CertificateAuthority,
    CsrRejected,
    IssuedCertificate,
)
from meshway.identity.csr import build_csr, generate_key, key_to_pem
from meshway.identity.spiffe import SpiffeId

__all__ = [
    "CaError",
    "CertificateAuthority",
    "CsrRejected",
    "IssuedCertificate",
    "SpiffeId",
    "TrustBundle",
    "build_csr",
    "generate_key",
    "key_to_pem",
]
