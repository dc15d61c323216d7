"""The requester side of certificate issuance, used by node proxies.

The proxy generates its key locally and sends only a CSR, so the private key never
leaves the process that uses it.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshway.identity.spiffe import SpiffeId

RequesterKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key: small, fast to handshake with, and accepted everywhere."""
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(key: RequesterKey, identity: SpiffeId) -> bytes:
    """A PEM CSR asking for `identity` as its only URI SAN (the subject is left empty)."""
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        # Critical because the subject is empty (RFC 5280 4.2.1.6).
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
    )
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def key_to_pem(key: RequesterKey) -> bytes:
    """Unencrypted PKCS#8 PEM; the caller is responsible for file permissions."""
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
