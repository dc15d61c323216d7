"""Mutual TLS for HBONE: TLS 1.3 only, ALPN h2, identities as SPIFFE URI SANs.

Peers are authenticated in two steps. OpenSSL verifies that the certificate chains to the
trust bundle; then `peer_identity` reads the SPIFFE ID from the leaf, because hostnames mean
nothing in the mesh (`check_hostname` is off on purpose) and the identity is what policy and
the client's expectation are checked against.

Cipher suites: Python's `ssl` cannot restrict TLS 1.3 suites (`set_ciphers` only affects
TLS 1.2 and older), so OpenSSL's TLS 1.3 defaults apply: TLS_AES_256_GCM_SHA384,
TLS_CHACHA20_POLY1305_SHA256 and TLS_AES_128_GCM_SHA256, in that order of preference. Two
Meshway peers therefore always agree on AES-256-GCM; ChaCha20 is only chosen by a foreign
client that prefers it.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from meshway.hbone.errors import HboneError
from meshway.identity import SpiffeId

ALPN_H2 = "h2"


class IdentityError(HboneError):
    """A peer's certificate does not carry exactly one valid SPIFFE identity."""


class IdentityMismatch(IdentityError):
    """The server proved an identity other than the one expected for the destination."""

    def __init__(self, expected: SpiffeId, actual: SpiffeId) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"server identity is {actual.uri}, expected {expected.uri}")


@dataclass(frozen=True)
class WorkloadCredentials:
    """What one workload needs to speak mTLS: its identity, chain, key and the roots it trusts.

    Frozen and compared by value, so a proxy can cache TLS contexts per credential set and a
    rotated certificate is simply a new, unequal value.
    """

    identity: SpiffeId
    cert_chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    trust_bundle_pem: bytes = field(repr=False)
    not_after: datetime

    @classmethod
    def from_pems(
        cls, cert_chain_pem: bytes, key_pem: bytes, trust_bundle_pem: bytes
    ) -> WorkloadCredentials:
        """Read the identity and expiry from the leaf and check that the key belongs to it."""
        try:
            chain = x509.load_pem_x509_certificates(cert_chain_pem)
        except ValueError as exc:
            raise IdentityError(f"certificate chain is not valid PEM: {exc}") from None
        leaf = chain[0]
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"private key is not an unencrypted PEM key: {exc}") from None
        if _spki(key.public_key()) != _spki(leaf.public_key()):
            raise IdentityError("the private key does not match the leaf certificate")
        return cls(
            identity=identity_from_certificate(leaf),
            cert_chain_pem=cert_chain_pem,
            key_pem=key_pem,
            trust_bundle_pem=trust_bundle_pem,
            not_after=leaf.not_valid_after_utc,
        )


def server_context(creds: WorkloadCredentials) -> ssl.SSLContext:
    """A context for port 15008: clients must present a certificate that chains to the bundle."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(ctx, creds)
    # No session tickets: resumption would skip the client-certificate check we rely on and
    # nothing in the mesh resumes sessions anyway.
    ctx.num_tickets = 0
    return ctx


def client_context(creds: WorkloadCredentials) -> ssl.SSLContext:
    """A context for dialling a peer's 15008; the server's SPIFFE ID is checked afterwards."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    _configure(ctx, creds)
    return ctx


class TlsContextCache:
    """Reuses one SSL context per identity until its credentials change.

    Building a context loads the key and parses the bundle (about a millisecond), too much for
    every connection; comparing credentials by value makes a rotated certificate take effect
    for the next connection while connections made with the old one keep running.
    """

    def __init__(self, build: Callable[[WorkloadCredentials], ssl.SSLContext]) -> None:
        self._build = build
        self._contexts: dict[SpiffeId, tuple[WorkloadCredentials, ssl.SSLContext]] = {}

    def get(self, creds: WorkloadCredentials) -> ssl.SSLContext:
        cached = self._contexts.get(creds.identity)
        if cached is not None and cached[0] == creds:
            return cached[1]
        context = self._build(creds)
        self._contexts[creds.identity] = (creds, context)
        return context


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId:
    """The SPIFFE ID of the peer of a completed handshake; IdentityError if it has none."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise IdentityError("the peer presented no certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise IdentityError(f"the peer certificate cannot be parsed: {exc}") from None
    return identity_from_certificate(cert)


def identity_from_certificate(cert: x509.Certificate) -> SpiffeId:
    """The single SPIFFE URI SAN of a workload certificate."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError("the certificate has no subjectAltName") from None
    except ValueError as exc:
        raise IdentityError(f"the certificate's extensions cannot be parsed: {exc}") from None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise IdentityError(f"expected exactly one URI SAN, the certificate has {len(uris)}")
    try:
        return SpiffeId.parse(uris[0])
    except ValueError as exc:
        raise IdentityError(str(exc)) from None


def _configure(ctx: ssl.SSLContext, creds: WorkloadCredentials) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([ALPN_H2])
    try:
        ctx.load_verify_locations(cadata=creds.trust_bundle_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError) as exc:
        raise IdentityError(f"the trust bundle cannot be loaded: {exc}") from None
    _load_key_pair(ctx, creds.cert_chain_pem, creds.key_pem)


def _load_key_pair(ctx: ssl.SSLContext, cert_chain_pem: bytes, key_pem: bytes) -> None:
    """Load cert and key without leaving the key on disk.

    `ssl` only loads from paths, so the PEMs go to an anonymous in-memory file (memfd) that
    OpenSSL opens through /proc and that disappears when we close it. Where memfd does not
    exist, a 0600 file in a private temporary directory is used and removed at once.
    """
    blob = key_pem.rstrip(b"\n") + b"\n" + cert_chain_pem
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None and Path("/proc/self/fd").is_dir():
        fd = memfd_create("meshway-hbone-credentials", os.MFD_CLOEXEC)
        try:
            _write_all(fd, blob)
            _load_cert_chain(ctx, f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="meshway-hbone-") as private_dir:
        path = Path(private_dir) / "credentials.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, blob)
        finally:
            os.close(fd)
        _load_cert_chain(ctx, str(path))


def _load_cert_chain(ctx: ssl.SSLContext, path: str) -> None:
    try:
        ctx.load_cert_chain(certfile=path)
    except ssl.SSLError as exc:
        raise IdentityError(f"the certificate chain and key cannot be loaded: {exc}") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
