"""The set of root certificates a mesh workload trusts.

A bundle holds several roots so a root can be rotated without an outage: during the
overlap, workloads trust both the old and the new root while leaf certificates are
reissued under the new one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """Hex SHA-256 over the DER certificate: the identity of a root inside a bundle."""
    return cert.fingerprint(hashes.SHA256()).hex()


def is_ca_certificate(cert: x509.Certificate) -> bool:
    """True when basicConstraints says CA:TRUE (absent basicConstraints means not a CA)."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        # Missing or unparseable extensions: not something we can trust as an issuer.
        return False
    return constraints.ca


class TrustBundle:
    """An ordered, fingerprint-deduplicated set of CA certificates."""

    def __init__(self, roots: Iterable[x509.Certificate] = ()) -> None:
        self._roots: dict[str, x509.Certificate] = {}
        for cert in roots:
            self.add(cert)

    @classmethod
    def from_pem(cls, data: bytes) -> TrustBundle:
        """Build a bundle from one or more concatenated PEM certificates."""
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise ValueError(f"trust bundle is not valid PEM certificates: {exc}") from None
        return cls(certs)

    def add(self, cert: x509.Certificate) -> bool:
        """Add a root; return False when it was already present. Rejects non-CA certificates."""
        if not is_ca_certificate(cert):
            raise ValueError(
                f"certificate {cert.subject.rfc4514_string()!r} is not a CA "
                "(basicConstraints CA:TRUE is required in a trust bundle)"
            )
        key = fingerprint_sha256(cert)
        if key in self._roots:
            return False
        self._roots[key] = cert
        return True

    def extend(self, certs: Iterable[x509.Certificate]) -> None:
        """Add several roots, keeping first-seen order."""
        for cert in certs:
            self.add(cert)

    @property
    def roots(self) -> list[x509.Certificate]:
        """The roots in insertion order (a copy, so callers cannot bypass `add`)."""
        return list(self._roots.values())

    @property
    def fingerprints(self) -> list[str]:
        """SHA-256 fingerprints of the roots, in the same order as `roots`."""
        return list(self._roots)

    def to_pem(self) -> bytes:
        """Concatenated PEM, the format `openssl verify -CAfile` and TLS stacks load."""
        return b"".join(cert.public_bytes(Encoding.PEM) for cert in self._roots.values())

    def __contains__(self, cert: object) -> bool:
        return isinstance(cert, x509.Certificate) and fingerprint_sha256(cert) in self._roots

    def __iter__(self) -> Iterator[x509.Certificate]:
        return iter(list(self._roots.values()))

    def __len__(self) -> int:
        return len(self._roots)

    def __repr__(self) -> str:
        return f"TrustBundle({len(self)} roots: {', '.join(fp[:16] for fp in self._roots)})"
