"""Pure tests for SPIFFE IDs, trust bundles, CSRs and the certificate authority."""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID
from cryptography.x509.verification import PolicyBuilder, Store

from meshway.identity import (
    CaError,
    CertificateAuthority,
    CsrRejected,
    SpiffeId,
    TrustBundle,
    build_csr,
    generate_key,
    key_to_pem,
)

pytestmark = pytest.mark.unit

TD = "cluster.local"
WEB = SpiffeId(TD, "default", "web")
PEM = serialization.Encoding.PEM

CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


# --- helpers ----------------------------------------------------------------------------------


def make_ca_cert(
    common_name: str,
    key: CaKey,
    issuer: tuple[x509.Certificate, CaKey] | None = None,
    *,
    is_ca: bool = True,
    key_cert_sign: bool = True,
    path_length: int | None = None,
    not_before: datetime | None = None,
    lifetime: timedelta = timedelta(days=365),
) -> x509.Certificate:
    """A CA certificate built the way an operator's own PKI might (independent of Meshway)."""
    now = datetime.now(UTC)
    start = not_before or now - timedelta(hours=1)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not key_cert_sign,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=key_cert_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    return builder.sign(issuer_key, hashes.SHA256())


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(PEM) for cert in certs)


def write_cacerts(
    directory: Path,
    ca_cert: x509.Certificate,
    ca_key: CaKey,
    root: x509.Certificate | bytes,
    chain: list[x509.Certificate],
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca-cert.pem").write_bytes(pem(ca_cert))
    (directory / "ca-key.pem").write_bytes(key_to_pem(ca_key))
    (directory / "root-cert.pem").write_bytes(root if isinstance(root, bytes) else pem(root))
    (directory / "cert-chain.pem").write_bytes(pem(*chain))
    return directory


def load_chain(pems: list[str]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(p.encode()) for p in pems]


def verify_client_chain(roots: list[x509.Certificate], chain: list[x509.Certificate]) -> list[str]:
    """RFC 5280 path validation by cryptography's verifier; returns the leaf's URI SANs."""
    verifier = PolicyBuilder().store(Store(roots)).build_client_verifier()
    verified = verifier.verify(chain[0], chain[1:])
    return [name.value for name in verified.subjects or []]


def san_values(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "state", TD)


@pytest.fixture(scope="module")
def ec_root() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    return make_ca_cert("Test Root", key, lifetime=timedelta(days=3650)), key


# --- SPIFFE IDs -------------------------------------------------------------------------------


def test_spiffe_id_forms() -> None:
    assert WEB.uri == "spiffe://cluster.local/ns/default/sa/web"
    assert WEB.principal == "cluster.local/ns/default/sa/web"
    assert str(WEB) == WEB.uri


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://cluster.local/ns/default/sa/web",
        "spiffe://example.org/ns/kube-system/sa/coredns",
        "spiffe://td_1.example-2.org/ns/a1/sa/my.sa-2",
        "spiffe://a/ns/b/sa/c",
    ],
)
def test_spiffe_parse_round_trip(uri: str) -> None:
    parsed = SpiffeId.parse(uri)
    assert parsed.uri == uri
    assert SpiffeId.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "cluster.local/ns/default/sa/web",
        "http://cluster.local/ns/default/sa/web",
        "SPIFFE://cluster.local/ns/default/sa/web",
        "spiffe://Cluster.local/ns/default/sa/web",
        "spiffe:///ns/default/sa/web",
        "spiffe://cluster.local",
        "spiffe://cluster.local/",
        "spiffe://cluster.local/ns/default",
        "spiffe://cluster.local/ns/default/sa/",
        "spiffe://cluster.local/ns//sa/web",
        "spiffe://cluster.local/ns/default/sa/web/",
        "spiffe://cluster.local/ns/default/sa/web/extra",
        "spiffe://cluster.local/sa/web/ns/default",
        "spiffe://cluster.local/ns/Default/sa/web",
        "spiffe://cluster.local/ns/default/sa/web?x=1",
        "spiffe://cluster.local/ns/default/sa/web#frag",
        "spiffe://cluster.local:8080/ns/default/sa/web",
        "spiffe://user@cluster.local/ns/default/sa/web",
        "spiffe://cluster..local/ns/default/sa/web",
        "spiffe://cluster.local/ns/-default/sa/web",
        "spiffe://cluster.local/ns/def%2fault/sa/web",
        "spiffe://cluster.local/ns/default/sa/web\n",
        "spiffe://cluster.local/ns/a.b/sa/web",
        f"spiffe://cluster.local/ns/{'a' * 64}/sa/web",
    ],
)
def test_spiffe_parse_rejects(uri: str) -> None:
    with pytest.raises(ValueError, match="invalid SPIFFE ID"):
        SpiffeId.parse(uri)


def test_spiffe_constructor_validates_names() -> None:
    with pytest.raises(ValueError, match="namespace 'Default'"):
        SpiffeId(TD, "Default", "web")
    with pytest.raises(ValueError, match="service account is empty"):
        SpiffeId(TD, "default", "")
    with pytest.raises(ValueError, match="trust domain"):
        SpiffeId("bad/domain", "default", "web")


# --- trust bundle -----------------------------------------------------------------------------


def test_bundle_from_pem_dedupes_keeps_order_and_round_trips() -> None:
    roots = [make_ca_cert(f"Root {i}", ec.generate_private_key(ec.SECP256R1())) for i in range(3)]
    bundle = TrustBundle.from_pem(pem(roots[1], roots[0], roots[1], roots[2], roots[0]))
    assert len(bundle) == 3
    assert bundle.roots == [roots[1], roots[0], roots[2]]
    assert bundle.add(roots[2]) is False
    assert roots[0] in bundle
    assert TrustBundle.from_pem(bundle.to_pem()).roots == bundle.roots


def test_bundle_rejects_non_ca_and_garbage(ec_root: tuple[x509.Certificate, CaKey]) -> None:
    root, _ = ec_root
    leaf = make_ca_cert("leaf", ec.generate_private_key(ec.SECP256R1()), ec_root, is_ca=False)
    with pytest.raises(ValueError, match="not a CA"):
        TrustBundle.from_pem(pem(root, leaf))
    with pytest.raises(ValueError, match="not a CA"):
        TrustBundle().add(leaf)
    with pytest.raises(ValueError):
        TrustBundle.from_pem(b"not a certificate")
    with pytest.raises(ValueError):
        TrustBundle.from_pem(b"")


# --- self-signed root -------------------------------------------------------------------------


def test_root_created_with_private_modes(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "state", TD)
    ca_dir = tmp_path / "state" / "ca"
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((ca_dir / "root-key.pem").stat().st_mode) == 0o600
    assert sorted(p.name for p in ca_dir.iterdir()) == [".lock", "root-cert.pem", "root-key.pem"]

    root = x509.load_pem_x509_certificate((ca_dir / "root-cert.pem").read_bytes())
    assert ca.signing_cert == root
    assert ca.root_certs == [root]
    assert ca.chain == []
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Meshway Root CA"
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == TD
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    lifetime = root.not_valid_after_utc - root.not_valid_before_utc
    assert timedelta(days=3640) < lifetime < timedelta(days=3660)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)


def test_root_reused_across_restarts(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path, TD)
    key_bytes = (tmp_path / "ca" / "root-key.pem").read_bytes()
    second = CertificateAuthority.load_or_create(tmp_path, TD)
    assert second.trust_bundle.fingerprints == first.trust_bundle.fingerprints
    assert (tmp_path / "ca" / "root-key.pem").read_bytes() == key_bytes
    # A certificate issued before the restart still verifies against the reloaded root.
    issued = first.sign_csr(build_csr(generate_key(), WEB), WEB)
    assert verify_client_chain(second.root_certs, load_chain(issued.cert_chain_pem)) == [WEB.uri]


def test_concurrent_first_starts_agree_on_one_root(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        cas = list(pool.map(lambda _: CertificateAuthority.load_or_create(tmp_path, TD), range(8)))
    assert len({ca.trust_bundle.fingerprints[0] for ca in cas}) == 1


def test_existing_ca_dir_is_tightened(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir(mode=0o755)
    os.chmod(tmp_path / "ca", 0o755)
    CertificateAuthority.load_or_create(tmp_path, TD)
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700


def test_corrupt_root_key_is_an_error_and_left_alone(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD)
    key_path = tmp_path / "ca" / "root-key.pem"
    key_path.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(CaError, match="not a valid PEM private key") as excinfo:
        CertificateAuthority.load_or_create(tmp_path, TD)
    assert str(key_path) in str(excinfo.value)
    assert b"garbage" in key_path.read_bytes()


def test_corrupt_root_cert_is_an_error(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD)
    cert_path = tmp_path / "ca" / "root-cert.pem"
    cert_path.write_bytes(b"junk")
    with pytest.raises(CaError, match="not a valid PEM certificate") as excinfo:
        CertificateAuthority.load_or_create(tmp_path, TD)
    assert str(cert_path) in str(excinfo.value)


def test_mismatched_root_key_is_an_error(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path / "a", TD)
    CertificateAuthority.load_or_create(tmp_path / "b", TD)
    other_key = (tmp_path / "b" / "ca" / "root-key.pem").read_bytes()
    (tmp_path / "a" / "ca" / "root-key.pem").write_bytes(other_key)
    with pytest.raises(CaError, match="does not match"):
        CertificateAuthority.load_or_create(tmp_path / "a", TD)
    assert (tmp_path / "a" / "ca" / "root-key.pem").read_bytes() == other_key


def test_half_present_root_is_an_error_not_a_new_root(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD)
    key_path = tmp_path / "ca" / "root-key.pem"
    key_bytes = key_path.read_bytes()
    (tmp_path / "ca" / "root-cert.pem").unlink()
    with pytest.raises(CaError, match=r"root-cert\.pem: missing"):
        CertificateAuthority.load_or_create(tmp_path, TD)
    assert key_path.read_bytes() == key_bytes
    assert not (tmp_path / "ca" / "root-cert.pem").exists()


def test_invalid_trust_domain_is_a_ca_error(tmp_path: Path) -> None:
    with pytest.raises(CaError, match="trust domain"):
        CertificateAuthority.load_or_create(tmp_path, "Not A Domain")


# --- signing ----------------------------------------------------------------------------------


def test_sign_csr_issues_a_workload_certificate(ca: CertificateAuthority) -> None:
    key = generate_key()
    issued = ca.sign_csr(build_csr(key, WEB), WEB)
    assert issued.identity == WEB
    assert len(issued.cert_chain_pem) == 1  # signed by the root itself: no root in the chain
    leaf = x509.load_pem_x509_certificate(issued.leaf_pem.encode())

    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(WEB.uri)]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_encipherment
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = ca.signing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert aki.key_identifier == root_ski.value.digest
    leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert leaf.public_key() == key.public_key()
    assert leaf.signature_hash_algorithm is not None
    assert leaf.signature_hash_algorithm.name == "sha256"
    assert leaf.serial_number == issued.serial
    assert (leaf.not_valid_before_utc, leaf.not_valid_after_utc) == (
        issued.not_before,
        issued.not_after,
    )
    assert verify_client_chain(ca.root_certs, [leaf]) == [WEB.uri]


def test_default_lifetime_is_24h_with_backdating(ca: CertificateAuthority) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    issued = ca.sign_csr(build_csr(generate_key(), WEB), WEB)
    after = datetime.now(UTC)
    assert issued.not_after - issued.not_before == timedelta(hours=24, minutes=1)
    assert before + timedelta(hours=24) <= issued.not_after <= after + timedelta(hours=24)
    assert issued.not_before.tzinfo is not None


def test_custom_ttl_is_honoured(ca: CertificateAuthority) -> None:
    issued = ca.sign_csr(build_csr(generate_key(), WEB), WEB, ttl=timedelta(hours=2))
    assert issued.not_after - issued.not_before == timedelta(hours=2, minutes=1)


@pytest.mark.parametrize("ttl", [timedelta(seconds=5), timedelta(days=31), timedelta(0)])
def test_ttl_outside_bounds_is_rejected(ca: CertificateAuthority, ttl: timedelta) -> None:
    with pytest.raises(CsrRejected, match="ttl"):
        ca.sign_csr(build_csr(generate_key(), WEB), WEB, ttl=ttl)


def test_max_ttl_is_configurable(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, TD, max_ttl=timedelta(hours=2))
    assert ca.max_ttl == timedelta(hours=2)
    csr = build_csr(generate_key(), WEB)
    ca.sign_csr(csr, WEB, ttl=timedelta(hours=2))
    with pytest.raises(CsrRejected, match="ttl"):
        ca.sign_csr(csr, WEB, ttl=timedelta(hours=3))


def test_csr_for_another_identity_is_rejected(ca: CertificateAuthority) -> None:
    other = SpiffeId(TD, "default", "admin")
    with pytest.raises(CsrRejected) as excinfo:
        ca.sign_csr(build_csr(generate_key(), other), WEB)
    message = str(excinfo.value)
    assert other.uri in message and WEB.uri in message


def test_csr_with_extra_san_is_rejected(ca: CertificateAuthority) -> None:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(WEB.uri), x509.DNSName("evil.example")]
            ),
            critical=False,
        )
        .sign(generate_key(), hashes.SHA256())
    )
    with pytest.raises(CsrRejected, match=r"DNS:evil\.example"):
        ca.sign_csr(csr.public_bytes(PEM), WEB)


def test_csr_without_san_gets_the_caller_identity(ca: CertificateAuthority) -> None:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")]))
        .sign(generate_key(), hashes.SHA256())
    )
    issued = ca.sign_csr(csr.public_bytes(serialization.Encoding.DER), WEB)
    leaf = load_chain(issued.cert_chain_pem)[0]
    assert leaf.subject == x509.Name([])
    assert san_values(leaf) == [x509.UniformResourceIdentifier(WEB.uri)]


def test_identity_outside_the_trust_domain_is_rejected(ca: CertificateAuthority) -> None:
    foreign = SpiffeId("other.domain", "default", "web")
    with pytest.raises(CsrRejected, match="trust domain"):
        ca.sign_csr(build_csr(generate_key(), foreign), foreign)


def test_tampered_csr_is_rejected(ca: CertificateAuthority) -> None:
    csr = x509.load_pem_x509_csr(build_csr(generate_key(), SpiffeId(TD, "default", "wex")))
    der = csr.public_bytes(serialization.Encoding.DER)
    # Rewrite the requested identity in the signed body without re-signing.
    tampered = der.replace(b"/sa/wex", b"/sa/web")
    assert tampered != der
    with pytest.raises(CsrRejected, match="signature"):
        ca.sign_csr(tampered, WEB)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        b"\x30\x03\x02\x01\x01",
    ],
)
def test_garbage_is_rejected(ca: CertificateAuthority, data: bytes) -> None:
    with pytest.raises(CsrRejected, match="not a PEM certificate signing request"):
        ca.sign_csr(data, WEB)


def test_certificate_pem_is_not_a_csr(ca: CertificateAuthority) -> None:
    with pytest.raises(CsrRejected, match="not a PEM certificate signing request"):
        ca.sign_csr(ca.trust_bundle.to_pem(), WEB)


@pytest.mark.parametrize(
    "key_factory",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
        lambda: ec.generate_private_key(ec.SECP521R1()),
        lambda: ec.generate_private_key(ec.SECP256K1()),
    ],
    ids=["rsa-1024", "p-521", "secp256k1"],
)
def test_weak_or_unexpected_keys_are_rejected(
    ca: CertificateAuthority, key_factory: Callable[[], CaKey]
) -> None:
    with pytest.raises(CsrRejected, match="key"):
        ca.sign_csr(build_csr(key_factory(), WEB), WEB)


def test_p384_and_rsa_keys_are_accepted(ca: CertificateAuthority) -> None:
    p384 = ca.sign_csr(build_csr(ec.generate_private_key(ec.SECP384R1()), WEB), WEB)
    p384_key = load_chain(p384.cert_chain_pem)[0].public_key()
    assert isinstance(p384_key, ec.EllipticCurvePublicKey) and p384_key.curve.name == "secp384r1"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = load_chain(ca.sign_csr(build_csr(rsa_key, WEB), WEB).cert_chain_pem)[0]
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment


def test_serials_are_random_positive_128_bit(ca: CertificateAuthority) -> None:
    csr = build_csr(generate_key(), WEB)
    serials = {ca.sign_csr(csr, WEB).serial for _ in range(50)}
    assert len(serials) == 50
    assert all(0 < serial < 2**128 for serial in serials)
    assert max(serials).bit_length() > 100


def test_trust_bundle_is_a_copy(ca: CertificateAuthority) -> None:
    ca.trust_bundle.add(make_ca_cert("Intruder", ec.generate_private_key(ec.SECP256R1())))
    assert len(ca.trust_bundle) == 1


# --- serving certificate ----------------------------------------------------------------------


def test_serving_certificate(ca: CertificateAuthority) -> None:
    ips = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    chain_pem, key_pem = ca.issue_serving_certificate(["meshway-cp.local", "localhost"], ips)
    chain = x509.load_pem_x509_certificates(chain_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert len(chain) == 1
    leaf = chain[0]
    assert leaf.public_key() == key.public_key()
    assert san_values(leaf) == [
        x509.DNSName("meshway-cp.local"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime == timedelta(days=365, minutes=1)
    verifier = (
        PolicyBuilder()
        .store(Store(ca.root_certs))
        .build_server_verifier(x509.DNSName("meshway-cp.local"))
    )
    verifier.verify(leaf, [])
    with pytest.raises(ValueError, match="at least one"):
        ca.issue_serving_certificate([], [])


# --- cacerts layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("key_kind", ["ec", "rsa"])
@pytest.mark.parametrize("chain_has_root", [True, False])
def test_cacerts_intermediate_chain(
    tmp_path: Path,
    ec_root: tuple[x509.Certificate, CaKey],
    key_kind: str,
    chain_has_root: bool,
) -> None:
    root, _ = ec_root
    inter_key: CaKey = (
        ec.generate_private_key(ec.SECP256R1())
        if key_kind == "ec"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    inter = make_ca_cert("Test Intermediate", inter_key, ec_root, path_length=0)
    chain_file = [inter, root] if chain_has_root else [inter]
    cacerts = write_cacerts(tmp_path / "cacerts", inter, inter_key, root, chain_file)

    ca = CertificateAuthority.load_or_create(tmp_path / "state", TD, cacerts_dir=cacerts)
    assert not (tmp_path / "state").exists()  # plugged-in mode keeps nothing in the state dir
    assert ca.root_certs == [root]
    issued = ca.sign_csr(build_csr(generate_key(), WEB), WEB)
    chain = load_chain(issued.cert_chain_pem)
    assert chain[1:] == [inter]
    assert chain[0].issuer == inter.subject
    assert verify_client_chain(ca.root_certs, chain) == [WEB.uri]
    expected_signature = (
        SignatureAlgorithmOID.ECDSA_WITH_SHA256
        if key_kind == "ec"
        else SignatureAlgorithmOID.RSA_WITH_SHA256
    )
    assert chain[0].signature_algorithm_oid == expected_signature


def test_cacerts_two_intermediates(tmp_path: Path, ec_root: tuple[x509.Certificate, CaKey]) -> None:
    root, _ = ec_root
    upper_key = ec.generate_private_key(ec.SECP384R1())
    upper = make_ca_cert("Upper", upper_key, ec_root, path_length=1)
    lower_key = ec.generate_private_key(ec.SECP256R1())
    lower = make_ca_cert("Lower", lower_key, (upper, upper_key), path_length=0)
    cacerts = write_cacerts(tmp_path, lower, lower_key, root, [lower, upper, root])
    ca = CertificateAuthority.load_or_create(tmp_path / "state", TD, cacerts_dir=cacerts)
    chain = load_chain(ca.sign_csr(build_csr(generate_key(), WEB), WEB).cert_chain_pem)
    assert chain[1:] == [lower, upper]
    assert verify_client_chain([root], chain) == [WEB.uri]


def test_cacerts_with_root_as_signing_cert(
    tmp_path: Path, ec_root: tuple[x509.Certificate, CaKey]
) -> None:
    root, root_key = ec_root
    cacerts = write_cacerts(tmp_path, root, root_key, root, [root])
    ca = CertificateAuthority.load_or_create(tmp_path / "state", TD, cacerts_dir=cacerts)
    issued = ca.sign_csr(build_csr(generate_key(), WEB), WEB)
    assert len(issued.cert_chain_pem) == 1


def test_cacerts_leaf_never_outlives_the_intermediate(
    tmp_path: Path, ec_root: tuple[x509.Certificate, CaKey]
) -> None:
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = make_ca_cert("Short", inter_key, ec_root, lifetime=timedelta(hours=3))
    cacerts = write_cacerts(tmp_path, inter, inter_key, ec_root[0], [inter])
    ca = CertificateAuthority.load_or_create(tmp_path / "state", TD, cacerts_dir=cacerts)
    issued = ca.sign_csr(build_csr(generate_key(), WEB), WEB, ttl=timedelta(hours=24))
    assert issued.not_after == inter.not_valid_after_utc


def test_cacerts_root_bundle_with_two_roots(
    tmp_path: Path, ec_root: tuple[x509.Certificate, CaKey]
) -> None:
    old_root, _ = ec_root
    new_root = make_ca_cert("New Root", ec.generate_private_key(ec.SECP256R1()))
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = make_ca_cert("Intermediate", inter_key, ec_root)
    cacerts = write_cacerts(tmp_path, inter, inter_key, pem(new_root, old_root), [inter])
    ca = CertificateAuthority.load_or_create(tmp_path / "state", TD, cacerts_dir=cacerts)
    assert ca.root_certs == [new_root, old_root]


@pytest.mark.parametrize(
    "missing", ["ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"]
)
def test_cacerts_missing_file_is_named(
    tmp_path: Path, ec_root: tuple[x509.Certificate, CaKey], missing: str
) -> None:
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = make_ca_cert("Intermediate", inter_key, ec_root)
    cacerts = write_cacerts(tmp_path, inter, inter_key, ec_root[0], [inter])
    (cacerts / missing).unlink()
    with pytest.raises(CaError, match="missing") as excinfo:
        CertificateAuthority.load_or_create(tmp_path / "state", TD, cacerts_dir=cacerts)
    assert str(cacerts / missing) in str(excinfo.value)


def test_cacerts_key_mismatch_is_named(
    tmp_path: Path, ec_root: tuple[x509.Certificate, CaKey]
) -> None:
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = make_ca_cert("Intermediate", inter_key, ec_root)
    cacerts = write_cacerts(tmp_path, inter, generate_key(), ec_root[0], [inter])
    with pytest.raises(CaError, match="does not match") as excinfo:
        CertificateAuthority.load_or_create(tmp_path / "state", TD, cacerts_dir=cacerts)
    assert str(cacerts / "ca-key.pem") in str(excinfo.value)


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ({"is_ca": False}, "not a CA"),
        ({"key_cert_sign": False}, "keyCertSign"),
        ({"lifetime": timedelta(minutes=30)}, "expired"),
        ({"not_before": datetime.now(UTC) + timedelta(days=1)}, "not valid until"),
    ],
    ids=["not-ca", "no-keycertsign", "expired", "not-yet-valid"],
)
def test_cacerts_bad_signing_cert_is_named(
    tmp_path: Path,
    ec_root: tuple[x509.Certificate, CaKey],
    variant: dict[str, object],
    expected: str,
) -> None:
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = make_ca_cert("Intermediate", inter_key, ec_root, **variant)  # type: ignore[arg-type]
    cacerts = write_cacerts(tmp_path, inter, inter_key, ec_root[0], [inter])
    with pytest.raises(CaError, match=expected) as excinfo:
        CertificateAuthority.load_or_create(tmp_path / "state", TD, cacerts_dir=cacerts)
    assert str(cacerts / "ca-cert.pem") in str(excinfo.value)


@pytest.mark.parametrize("chain_has_root", [True, False])
def test_cacerts_chain_to_a_different_root_is_rejected(
    tmp_path: Path, ec_root: tuple[x509.Certificate, CaKey], chain_has_root: bool
) -> None:
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = make_ca_cert("Intermediate", inter_key, ec_root)
    unrelated = make_ca_cert("Unrelated Root", ec.generate_private_key(ec.SECP256R1()))
    chain = [inter, ec_root[0]] if chain_has_root else [inter]
    cacerts = write_cacerts(tmp_path, inter, inter_key, unrelated, chain)
    with pytest.raises(CaError) as excinfo:
        CertificateAuthority.load_or_create(tmp_path / "state", TD, cacerts_dir=cacerts)
    assert str(cacerts / "root-cert.pem") in str(excinfo.value)
    assert str(cacerts / "cert-chain.pem") in str(excinfo.value)


def test_cacerts_broken_link_in_chain_is_rejected(
    tmp_path: Path, ec_root: tuple[x509.Certificate, CaKey]
) -> None:
    upper_key = ec.generate_private_key(ec.SECP256R1())
    upper = make_ca_cert("Upper", upper_key, ec_root)
    lower_key = ec.generate_private_key(ec.SECP256R1())
    lower = make_ca_cert("Lower", lower_key, ec_root)  # not signed by Upper
    cacerts = write_cacerts(tmp_path, lower, lower_key, ec_root[0], [lower, upper])
    with pytest.raises(CaError, match="not signed by the next certificate"):
        CertificateAuthority.load_or_create(tmp_path / "state", TD, cacerts_dir=cacerts)


def test_cacerts_path_length_violation_is_rejected(
    tmp_path: Path, ec_root: tuple[x509.Certificate, CaKey]
) -> None:
    upper_key = ec.generate_private_key(ec.SECP256R1())
    upper = make_ca_cert("Upper", upper_key, ec_root, path_length=0)
    lower_key = ec.generate_private_key(ec.SECP256R1())
    lower = make_ca_cert("Lower", lower_key, (upper, upper_key))
    cacerts = write_cacerts(tmp_path, lower, lower_key, ec_root[0], [lower, upper])
    with pytest.raises(CaError, match="pathLenConstraint"):
        CertificateAuthority.load_or_create(tmp_path / "state", TD, cacerts_dir=cacerts)


def test_cacerts_encrypted_key_is_rejected(
    tmp_path: Path, ec_root: tuple[x509.Certificate, CaKey]
) -> None:
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = make_ca_cert("Intermediate", inter_key, ec_root)
    cacerts = write_cacerts(tmp_path, inter, inter_key, ec_root[0], [inter])
    (cacerts / "ca-key.pem").write_bytes(
        inter_key.private_bytes(
            PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(CaError, match="encrypted"):
        CertificateAuthority.load_or_create(tmp_path / "state", TD, cacerts_dir=cacerts)


# --- extra roots ------------------------------------------------------------------------------


def test_extra_roots_join_the_bundle(tmp_path: Path) -> None:
    old = CertificateAuthority.load_or_create(tmp_path / "old", TD)
    old_root_file = tmp_path / "old" / "ca" / "root-cert.pem"
    new = CertificateAuthority.load_or_create(tmp_path / "new", TD, extra_roots=[old_root_file])
    assert new.root_certs == [new.signing_cert, old.signing_cert]
    old_leaf = load_chain(old.sign_csr(build_csr(generate_key(), WEB), WEB).cert_chain_pem)
    new_leaf = load_chain(new.sign_csr(build_csr(generate_key(), WEB), WEB).cert_chain_pem)
    assert verify_client_chain(new.root_certs, old_leaf) == [WEB.uri]
    assert verify_client_chain(new.root_certs, new_leaf) == [WEB.uri]
    # Listing a root twice (or the CA's own root) does not duplicate it.
    again = CertificateAuthority.load_or_create(
        tmp_path / "new", TD, extra_roots=[old_root_file, old_root_file]
    )
    assert len(again.trust_bundle) == 2


def test_bad_extra_roots_are_named(tmp_path: Path, ec_root: tuple[x509.Certificate, CaKey]) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(CaError, match="missing") as excinfo:
        CertificateAuthority.load_or_create(tmp_path / "s", TD, extra_roots=[missing])
    assert str(missing) in str(excinfo.value)

    leaf_file = tmp_path / "leaf.pem"
    leaf = make_ca_cert("leaf", generate_key(), ec_root, is_ca=False)
    leaf_file.write_bytes(pem(leaf))
    with pytest.raises(CaError, match="not a CA") as excinfo:
        CertificateAuthority.load_or_create(tmp_path / "s", TD, extra_roots=[leaf_file])
    assert str(leaf_file) in str(excinfo.value)


# --- TLS interop ------------------------------------------------------------------------------


def _tls_context(
    tmp_path: Path, name: str, chain_pem: bytes, key_pem: bytes, trusted_pem: bytes, server: bool
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    # SPIFFE peers are checked by URI SAN in the proxy, not by hostname.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_verify_locations(cadata=trusted_pem.decode())
    (tmp_path / f"{name}-chain.pem").write_bytes(chain_pem)
    (tmp_path / f"{name}-key.pem").write_bytes(key_pem)
    context.load_cert_chain(tmp_path / f"{name}-chain.pem", tmp_path / f"{name}-key.pem")
    return context


def _handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> ssl.SSLObject:
    """Drive a TLS handshake through memory BIOs; return the server side."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(client_in, client_out, server_side=False)
    server = server_ctx.wrap_bio(server_in, server_out, server_side=True)
    done: set[str] = set()
    for _ in range(10):
        for label, side, outgoing, peer_incoming in (
            ("client", client, client_out, server_in),
            ("server", server, server_out, client_in),
        ):
            try:
                side.do_handshake()
                done.add(label)
            except ssl.SSLWantReadError:
                pass
            peer_incoming.write(outgoing.read())
        if done == {"client", "server"}:
            return server
    raise AssertionError("TLS handshake did not complete")


def _workload_credentials(ca: CertificateAuthority, identity: SpiffeId) -> tuple[bytes, bytes]:
    key = generate_key()
    return ca.sign_csr(build_csr(key, identity), identity).chain_pem_bytes, key_to_pem(key)


def test_issued_certificates_complete_mutual_tls(
    tmp_path: Path, ec_root: tuple[x509.Certificate, CaKey]
) -> None:
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = make_ca_cert("Intermediate", inter_key, ec_root, path_length=0)
    cacerts = write_cacerts(tmp_path / "cacerts", inter, inter_key, ec_root[0], [inter, ec_root[0]])
    ca = CertificateAuthority.load_or_create(tmp_path / "state", TD, cacerts_dir=cacerts)
    bundle = ca.trust_bundle.to_pem()
    client_id, server_id = SpiffeId(TD, "default", "sleep"), SpiffeId(TD, "default", "httpbin")
    client_ctx = _tls_context(
        tmp_path, "client", *_workload_credentials(ca, client_id), bundle, server=False
    )
    server_ctx = _tls_context(
        tmp_path, "server", *_workload_credentials(ca, server_id), bundle, server=True
    )
    server = _handshake(client_ctx, server_ctx)
    peer = server.getpeercert()
    assert peer is not None
    assert peer["subjectAltName"] == (("URI", client_id.uri),)

    # A client whose certificate comes from an unrelated CA is refused by the server.
    stranger = CertificateAuthority.load_or_create(tmp_path / "stranger", TD)
    stranger_ctx = _tls_context(
        tmp_path, "stranger", *_workload_credentials(stranger, client_id), bundle, server=False
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(stranger_ctx, server_ctx)
