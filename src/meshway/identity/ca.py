"""Meshway's certificate authority: signs short-lived SPIFFE workload certificates.

Two ways to get a signing key:

* Istio's `cacerts` layout (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem), so an
  operator can plug in an intermediate from their own PKI. Everything is checked at load
  time because a bad chain otherwise shows up later as every mTLS handshake failing.
* A self-signed root kept under the state directory, created on first start and reused on
  every restart so issued certificates keep verifying.

Issuance never touches the filesystem: the key, issuer name and chain are parsed once, and
`sign_csr` only reads immutable state, so it is safe to call from several threads.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import itertools
import logging
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshway.identity.bundle import TrustBundle, fingerprint_sha256, is_ca_certificate
from meshway.identity.csr import generate_key, key_to_pem
from meshway.identity.spiffe import SpiffeId, validate_trust_domain

log = logging.getLogger(__name__)

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_WORKLOAD_TTL = timedelta(hours=24)
DEFAULT_MAX_TTL = timedelta(days=30)
DEFAULT_SERVING_TTL = timedelta(days=365)
# Short enough for tests of rotation under load; the default lifetime is 24 h.
MIN_TTL = timedelta(seconds=10)
# Backdating absorbs clock skew between the CA and the peers that verify its certificates.
CLOCK_SKEW = timedelta(minutes=1)
ROOT_LIFETIME = timedelta(days=3650)
ROOT_COMMON_NAME = "Meshway Root CA"

# Self-signed mode, under <state_dir>/ca/.
CA_STATE_SUBDIR = "ca"
ROOT_CERT_FILE = "root-cert.pem"
ROOT_KEY_FILE = "root-key.pem"
# Istio's plugged-in CA ("cacerts") layout.
CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"
CERT_CHAIN_FILE = "cert-chain.pem"
CACERTS_FILES = (CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE)

_ALLOWED_EC_CURVES = (ec.SECP256R1, ec.SECP384R1)
_MIN_RSA_BITS = 2048
_MAX_CSR_BYTES = 64 * 1024


def _key_usage(**enabled: bool) -> x509.KeyUsage:
    """A KeyUsage with only the named bits set."""
    flags = dict.fromkeys(
        (
            "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
            "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
        ),
        False,
    )  # fmt: skip
    flags.update(enabled)
    return x509.KeyUsage(**flags)


_EC_LEAF_KEY_USAGE = _key_usage(digital_signature=True)
# RSA key exchange (TLS 1.2 RSA kx) encrypts to the certificate key, so RSA leaves need it.
_RSA_LEAF_KEY_USAGE = _key_usage(digital_signature=True, key_encipherment=True)
_ROOT_KEY_USAGE = _key_usage(key_cert_sign=True, crl_sign=True)
_WORKLOAD_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)
_SERVING_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
_LEAF_CONSTRAINTS = x509.BasicConstraints(ca=False, path_length=None)


class CaError(Exception):
    """The CA cannot start or cannot issue: bad configuration, bad files, expired signer."""


class CsrRejected(CaError):
    """A certificate signing request was refused; the message says why."""


@dataclass
class IssuedCertificate:
    """A signed certificate plus what a peer needs to verify it up to a trusted root."""

    cert_chain_pem: list[str]
    """Leaf first, then the CA's signing certificate and intermediates; never the root."""
    not_before: datetime
    not_after: datetime
    serial: int
    identity: SpiffeId

    @property
    def leaf_pem(self) -> str:
        """The workload's own certificate."""
        return self.cert_chain_pem[0]

    @property
    def chain_pem_bytes(self) -> bytes:
        """The whole chain as one PEM blob, the form TLS libraries load."""
        return "".join(self.cert_chain_pem).encode("ascii")


class CertificateAuthority:
    """Signs workload certificates with one signing key; see `load_or_create`."""

    def __init__(
        self,
        trust_domain: str,
        signing_cert: x509.Certificate,
        signing_key: SigningKey,
        chain: Sequence[x509.Certificate],
        trust_bundle: TrustBundle,
        *,
        max_ttl: timedelta = DEFAULT_MAX_TTL,
    ) -> None:
        """`chain` is what follows each leaf: the signing cert and intermediates, no root.

        Leave `chain` empty when the signing certificate is itself a root.
        """
        try:
            validate_trust_domain(trust_domain)
        except ValueError as exc:
            raise CaError(str(exc)) from None
        if not isinstance(signing_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise CaError(f"unsupported signing key type {type(signing_key).__name__}")
        if _spki(signing_key.public_key()) != _spki(signing_cert.public_key()):
            raise CaError("the signing key does not match the signing certificate")
        if chain and chain[0] != signing_cert:
            raise CaError("the certificate chain must start with the signing certificate")
        if max_ttl < MIN_TTL:
            raise CaError(f"max_ttl {max_ttl} is shorter than the minimum {MIN_TTL}")
        if len(trust_bundle) == 0:
            raise CaError("the trust bundle is empty")
        self._trust_domain = trust_domain
        self._signing_cert = signing_cert
        self._signing_key = signing_key
        self._chain = list(chain)
        self._chain_pem = [_cert_pem(cert) for cert in chain]
        self._bundle = TrustBundle(trust_bundle.roots)
        self._max_ttl = max_ttl
        self._issuer_name = signing_cert.subject
        self._issuer_not_before = signing_cert.not_valid_before_utc
        self._issuer_not_after = signing_cert.not_valid_after_utc
        self._authority_key_id = _authority_key_identifier(signing_cert, signing_key)

    @classmethod
    def load_or_create(
        cls,
        state_dir: Path,
        trust_domain: str,
        cacerts_dir: Path | None = None,
        extra_roots: Sequence[Path] = (),
        *,
        max_ttl: timedelta = DEFAULT_MAX_TTL,
    ) -> CertificateAuthority:
        """Load the plugged-in `cacerts_dir`, or the self-signed root under `state_dir`.

        Without `cacerts_dir` the root is created on first start in `<state_dir>/ca/`.
        `extra_roots` are more trusted roots (e.g. the old root during a rotation).
        """
        try:
            validate_trust_domain(trust_domain)
        except ValueError as exc:
            raise CaError(f"trust domain: {exc}") from None
        if cacerts_dir is not None:
            signing_cert, signing_key, chain, roots = _load_cacerts(Path(cacerts_dir))
        else:
            ca_dir = Path(state_dir) / CA_STATE_SUBDIR
            signing_cert, signing_key = _load_or_create_root(ca_dir, trust_domain)
            chain, roots = [], [signing_cert]
        bundle = TrustBundle(roots)
        for extra_root_path in map(Path, extra_roots):
            for cert in _load_certs(extra_root_path):
                try:
                    bundle.add(cert)
                except ValueError as exc:
                    raise CaError(f"{extra_root_path}: {exc}") from None
        return cls(trust_domain, signing_cert, signing_key, chain, bundle, max_ttl=max_ttl)

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def signing_cert(self) -> x509.Certificate:
        """The certificate whose key signs leaves (a root in self-signed mode)."""
        return self._signing_cert

    @property
    def chain(self) -> list[x509.Certificate]:
        """Certificates sent after each leaf; empty when the signer is a root."""
        return list(self._chain)

    @property
    def trust_bundle(self) -> TrustBundle:
        """A copy of the roots workloads should trust, so callers cannot change ours."""
        return TrustBundle(self._bundle.roots)

    @property
    def root_certs(self) -> list[x509.Certificate]:
        return self._bundle.roots

    @property
    def max_ttl(self) -> timedelta:
        return self._max_ttl

    def sign_csr(
        self, csr_pem: bytes, identity: SpiffeId, ttl: timedelta = DEFAULT_WORKLOAD_TTL
    ) -> IssuedCertificate:
        """Issue a workload certificate for `identity`, which the caller has authenticated.

        The CSR only contributes its public key: the SAN comes from `identity`, and a CSR
        that asks for any other name is refused rather than silently narrowed.
        """
        if not MIN_TTL <= ttl <= self._max_ttl:
            raise CsrRejected(f"ttl {ttl} is outside the allowed range {MIN_TTL}..{self._max_ttl}")
        if identity.trust_domain != self._trust_domain:
            raise CsrRejected(
                f"identity {identity.uri} is in trust domain {identity.trust_domain!r}, "
                f"but this CA only issues for {self._trust_domain!r}"
            )
        csr = _load_csr(csr_pem)
        public_key = _checked_public_key(csr)
        try:
            signature_ok = csr.is_signature_valid
        except (UnsupportedAlgorithm, ValueError):
            signature_ok = False
        if not signature_ok:
            raise CsrRejected("CSR signature does not verify with the CSR's own public key")
        _check_requested_sans(csr, identity)
        cert = self._issue(
            public_key, [x509.UniformResourceIdentifier(identity.uri)], _WORKLOAD_EKU, ttl
        )
        return IssuedCertificate(
            cert_chain_pem=[_cert_pem(cert), *self._chain_pem],
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            serial=cert.serial_number,
            identity=identity,
        )

    def issue_serving_certificate(
        self,
        dns_names: Sequence[str],
        ips: Sequence[IPAddress] = (),
        ttl: timedelta = DEFAULT_SERVING_TTL,
    ) -> tuple[bytes, bytes]:
        """Return (cert_chain_pem, key_pem) for the control plane's own TLS endpoint."""
        if not dns_names and not ips:
            raise ValueError("a serving certificate needs at least one DNS name or IP address")
        if ttl < MIN_TTL:
            raise ValueError(f"ttl {ttl} is shorter than the minimum {MIN_TTL}")
        key = generate_key()
        sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
        sans += [x509.IPAddress(ip) for ip in ips]
        cert = self._issue(key.public_key(), sans, _SERVING_EKU, ttl)
        chain = "".join([_cert_pem(cert), *self._chain_pem]).encode("ascii")
        return chain, key_to_pem(key)

    def _issue(
        self,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        sans: list[x509.GeneralName],
        eku: x509.ExtendedKeyUsage,
        ttl: timedelta,
    ) -> x509.Certificate:
        now = datetime.now(UTC).replace(microsecond=0)
        if now >= self._issuer_not_after:
            raise CaError(f"the CA signing certificate expired at {self._issuer_not_after}")
        key_usage = (
            _RSA_LEAF_KEY_USAGE if isinstance(public_key, rsa.RSAPublicKey) else _EC_LEAF_KEY_USAGE
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._issuer_name)
            .public_key(public_key)
            .serial_number(_random_serial())
            .not_valid_before(max(now - CLOCK_SKEW, self._issuer_not_before))
            # A leaf must not outlive its issuer: verifiers would reject it after that anyway.
            .not_valid_after(min(now + ttl, self._issuer_not_after))
            # Critical because the subject is empty (RFC 5280 4.2.1.6).
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(_LEAF_CONSTRAINTS, critical=True)
            .add_extension(key_usage, critical=True)
            .add_extension(eku, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._authority_key_id, critical=False)
        )
        return builder.sign(self._signing_key, hashes.SHA256())


# --- CSR checks -----------------------------------------------------------------------------


def _load_csr(data: bytes) -> x509.CertificateSigningRequest:
    if len(data) > _MAX_CSR_BYTES:
        raise CsrRejected(f"CSR is {len(data)} bytes, more than the {_MAX_CSR_BYTES} allowed")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CsrRejected(f"not a PEM certificate signing request: {exc}") from None


def _checked_public_key(
    csr: x509.CertificateSigningRequest,
) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrRejected(f"CSR public key cannot be used: {exc}") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ALLOWED_EC_CURVES):
            raise CsrRejected(f"CSR key uses curve {key.curve.name}; only P-256 and P-384 allowed")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise CsrRejected(f"CSR RSA key is {key.key_size} bits; at least 2048 required")
        return key
    raise CsrRejected(f"CSR key type {type(key).__name__} is not allowed; use EC or RSA")


def _check_requested_sans(csr: x509.CertificateSigningRequest, identity: SpiffeId) -> None:
    """A CSR may omit SANs; if it names any, they must be exactly the caller's identity."""
    try:
        requested = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    except (x509.DuplicateExtension, x509.UnsupportedGeneralNameType, ValueError) as exc:
        raise CsrRejected(f"CSR extensions cannot be parsed: {exc}") from None
    allowed = x509.UniformResourceIdentifier(identity.uri)
    if list(requested) != [allowed]:
        asked = ", ".join(_describe_general_name(name) for name in requested) or "none"
        raise CsrRejected(f"CSR asks for SAN [{asked}] but the caller may only have URI:{identity}")


def _describe_general_name(name: x509.GeneralName) -> str:
    prefixes = {
        x509.UniformResourceIdentifier: "URI",
        x509.DNSName: "DNS",
        x509.IPAddress: "IP",
        x509.RFC822Name: "email",
    }
    prefix = prefixes.get(type(name), type(name).__name__)
    return f"{prefix}:{name.value}"


# --- Loading and creating CA material -------------------------------------------------------


def _load_cacerts(
    cacerts_dir: Path,
) -> tuple[x509.Certificate, SigningKey, list[x509.Certificate], list[x509.Certificate]]:
    """Load Istio's cacerts layout and return (signing cert, key, chain without root, roots)."""
    paths = {name: cacerts_dir / name for name in CACERTS_FILES}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise CaError(
            f"missing {', '.join(missing)} (a cacerts directory holds {', '.join(CACERTS_FILES)})"
        )
    ca_cert_path, ca_key_path = paths[CA_CERT_FILE], paths[CA_KEY_FILE]
    root_path, chain_path = paths[ROOT_CERT_FILE], paths[CERT_CHAIN_FILE]

    ca_cert = _load_single_cert(ca_cert_path)
    ca_key = _load_key(ca_key_path)
    roots = _load_certs(root_path)
    chain_file_certs = _load_certs(chain_path)

    if _spki(ca_key.public_key()) != _spki(ca_cert.public_key()):
        raise CaError(f"{ca_key_path}: key does not match the certificate in {ca_cert_path}")
    _check_signing_ca(ca_cert_path, ca_cert)
    now = datetime.now(UTC)
    _check_validity(ca_cert_path, ca_cert, now)
    for root in roots:
        if not is_ca_certificate(root):
            raise CaError(f"{root_path}: {_subject(root)} is not a CA certificate")

    root_fingerprints = {fingerprint_sha256(root) for root in roots}
    if fingerprint_sha256(ca_cert) in root_fingerprints:
        # The signing certificate is itself one of the roots: nothing to send after leaves.
        return ca_cert, ca_key, [], roots

    # cert-chain.pem usually repeats ca-cert.pem first and may end with the root; the chain
    # sent to peers is ca-cert plus intermediates, since peers already hold the roots.
    chain = [ca_cert]
    for cert in chain_file_certs:
        if cert == ca_cert or fingerprint_sha256(cert) in root_fingerprints:
            continue
        if _is_self_signed(cert):
            raise CaError(
                f"{chain_path}: contains the self-signed {_subject(cert)}, "
                f"which is not in {root_path}"
            )
        chain.append(cert)

    for depth, (child, parent) in enumerate(itertools.pairwise(chain), start=1):
        if not _directly_issued_by(child, parent):
            raise CaError(
                f"{chain_path}: {_subject(child)} is not signed by the next certificate "
                f"in the chain, {_subject(parent)}"
            )
        _check_chain_ca(chain_path, parent, depth, now)

    top = chain[-1]
    anchor = next((root for root in roots if _directly_issued_by(top, root)), None)
    if anchor is None:
        raise CaError(
            f"{chain_path}: the chain from {ca_cert_path} ends at {_subject(top)}, issued by "
            f"{top.issuer.rfc4514_string()!r}, which no certificate in {root_path} signed"
        )
    _check_chain_ca(root_path, anchor, len(chain), now)
    return ca_cert, ca_key, chain, roots


def _load_or_create_root(ca_dir: Path, trust_domain: str) -> tuple[x509.Certificate, SigningKey]:
    """Reuse the self-signed root in `ca_dir`, creating it only if neither file exists."""
    try:
        ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(ca_dir, 0o700)
    except OSError as exc:
        raise CaError(f"{ca_dir}: cannot create the CA directory: {exc.strerror}") from None
    cert_path, key_path = ca_dir / ROOT_CERT_FILE, ca_dir / ROOT_KEY_FILE
    # Serialise concurrent starts so two processes cannot each mint a different root.
    with _exclusive_lock(ca_dir / ".lock"):
        have_cert, have_key = os.path.lexists(cert_path), os.path.lexists(key_path)
        if not have_cert and not have_key:
            new_key = generate_key()
            new_cert = _build_self_signed_root(new_key, trust_domain)
            # Key first: a crash in between leaves a key without a cert, which load refuses
            # loudly, rather than a cert whose key is lost.
            _write_new_file(key_path, key_to_pem(new_key), 0o600)
            _write_new_file(cert_path, new_cert.public_bytes(serialization.Encoding.PEM), 0o644)
            log.info("created root CA %s in %s", fingerprint_sha256(new_cert)[:16], ca_dir)
            return new_cert, new_key
        if not have_key:
            raise CaError(
                f"{key_path}: missing while {cert_path} exists; restore the key, or remove "
                "both files to create a new root (all workload certificates change)"
            )
        if not have_cert:
            raise CaError(
                f"{cert_path}: missing while {key_path} exists; restore the certificate, or "
                "remove both files to create a new root (all workload certificates change)"
            )
        key = _load_key(key_path)
        cert = _load_single_cert(cert_path)
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise CaError(f"{key_path}: key does not match the certificate in {cert_path}")
    _check_signing_ca(cert_path, cert)
    _check_validity(cert_path, cert, datetime.now(UTC))
    mode = key_path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s has mode %o; it should be 0600", key_path, mode)
    return cert, key


def _build_self_signed_root(key: SigningKey, trust_domain: str) -> x509.Certificate:
    now = datetime.now(UTC).replace(microsecond=0)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, ROOT_COMMON_NAME),
        ]
    )
    subject_key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_random_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ROOT_KEY_USAGE, critical=True)
        .add_extension(subject_key_id, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(subject_key_id),
            critical=False,
        )
    )
    return builder.sign(key, hashes.SHA256())


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a new file atomically, never replacing an existing one.

    The temp file is created 0600 with O_EXCL, so a key is never readable by others even
    briefly, then hard-linked into place: like rename it is atomic, but it fails instead of
    overwriting if `path` appeared meanwhile.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise CaError(f"{path}: appeared while it was being created; not overwriting") from None
        except OSError:
            # No hard links on this filesystem; we hold the directory lock, so rename is safe.
            if os.path.lexists(path):
                raise CaError(f"{path}: already exists; not overwriting") from None
            os.rename(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise CaError(f"{path}: cannot write: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CaError(f"{lock_path}: cannot open lock file: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CaError(f"{path}: file is missing") from None
    except OSError as exc:
        raise CaError(f"{path}: cannot read: {exc.strerror}") from None


def _load_certs(path: Path) -> list[x509.Certificate]:
    data = _read(path)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CaError(f"{path}: not a valid PEM certificate file: {exc}") from None


def _load_single_cert(path: Path) -> x509.Certificate:
    certs = _load_certs(path)
    if len(certs) != 1:
        raise CaError(f"{path}: expected exactly one certificate, found {len(certs)}")
    return certs[0]


def _load_key(path: Path) -> SigningKey:
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CaError(
            f"{path}: the private key is encrypted; an unencrypted key is needed"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CaError(f"{path}: not a valid PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaError(f"{path}: {type(key).__name__} keys are not supported; use EC or RSA")
    return key


# --- Certificate checks ---------------------------------------------------------------------


def _check_signing_ca(path: Path, cert: x509.Certificate) -> None:
    """The signing certificate must be a CA allowed to sign certificates."""
    if not is_ca_certificate(cert):
        raise CaError(f"{path}: {_subject(cert)} is not a CA (basicConstraints CA:TRUE missing)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise CaError(f"{path}: {_subject(cert)} has no keyUsage extension") from None
    if not usage.key_cert_sign:
        raise CaError(f"{path}: {_subject(cert)} keyUsage does not include keyCertSign")


def _check_chain_ca(path: Path, cert: x509.Certificate, cas_below: int, now: datetime) -> None:
    """An issuer above the signing cert: a CA, currently valid, path length respected."""
    if not is_ca_certificate(cert):
        raise CaError(f"{path}: {_subject(cert)} is not a CA certificate")
    _check_validity(path, cert, now)
    path_length = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
    if path_length is not None and path_length < cas_below:
        raise CaError(
            f"{path}: {_subject(cert)} has pathLenConstraint {path_length} but "
            f"{cas_below} CA certificate(s) sit below it"
        )


def _check_validity(path: Path, cert: x509.Certificate, now: datetime) -> None:
    if now + CLOCK_SKEW < cert.not_valid_before_utc:
        raise CaError(f"{path}: {_subject(cert)} is not valid until {cert.not_valid_before_utc}")
    if now >= cert.not_valid_after_utc:
        raise CaError(f"{path}: {_subject(cert)} expired at {cert.not_valid_after_utc}")


def _directly_issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _is_self_signed(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer and _directly_issued_by(cert, cert)


def _authority_key_identifier(
    signing_cert: x509.Certificate, signing_key: SigningKey
) -> x509.AuthorityKeyIdentifier:
    """AKI must equal the issuer's SKI so verifiers can pick the right issuer during rotation."""
    try:
        ski = signing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _spki(public_key: PublicKeyTypes) -> bytes:
    """DER SubjectPublicKeyInfo: compares keys of any type without per-type number checks."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _random_serial() -> int:
    """A random positive 128-bit serial (RFC 5280 asks for positive, unpredictable serials)."""
    return secrets.randbits(128) or 1


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _subject(cert: x509.Certificate) -> str:
    return f"certificate {cert.subject.rfc4514_string()!r}"
