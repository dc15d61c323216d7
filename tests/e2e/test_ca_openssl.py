"""Check Meshway's CA output with the external `openssl` binary, an independent verifier.

The unit tests use the same library that produced the certificates; here a separate
implementation has to agree that chains verify, SANs and purposes are right, and that one
bundle with two roots covers a root rotation.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest

from meshway.identity import (
    CertificateAuthority,
    IssuedCertificate,
    SpiffeId,
    build_csr,
    generate_key,
)

OPENSSL = shutil.which("openssl")

# No skip: the independent check is the point (`make test` installs openssl).
pytestmark = pytest.mark.e2e

TD = "cluster.local"
WEB = SpiffeId(TD, "default", "web")


def openssl(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def openssl_ok(*args: str | Path, cwd: Path) -> str:
    result = openssl(*args, cwd=cwd)
    assert result.returncode == 0, f"openssl {' '.join(map(str, args))}: {result.stderr}"
    return result.stdout


def verify(
    directory: Path, bundle: Path, leaf: Path, untrusted: Path | None = None, *extra: str
) -> subprocess.CompletedProcess[str]:
    """`openssl verify` with strict X.509 checks, optionally with intermediates."""
    args: list[str | Path] = ["verify", "-x509_strict", *extra, "-CAfile", bundle]
    if untrusted is not None:
        args += ["-untrusted", untrusted]
    return openssl(*args, leaf, cwd=directory)


def write_issued(directory: Path, name: str, issued: IssuedCertificate) -> tuple[Path, Path]:
    """Write the leaf and the intermediates (everything after the leaf) as separate files."""
    leaf = directory / f"{name}-leaf.pem"
    leaf.write_text(issued.cert_chain_pem[0])
    intermediates = directory / f"{name}-intermediates.pem"
    intermediates.write_text("".join(issued.cert_chain_pem[1:]))
    return leaf, intermediates


def write_bundle(directory: Path, name: str, ca: CertificateAuthority) -> Path:
    path = directory / f"{name}.pem"
    path.write_bytes(ca.trust_bundle.to_pem())
    return path


def issue(ca: CertificateAuthority, identity: SpiffeId = WEB) -> IssuedCertificate:
    return ca.sign_csr(build_csr(generate_key(), identity), identity)


def test_workload_certificate_from_self_signed_root(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "state", TD)
    issued = issue(ca)
    assert len(issued.cert_chain_pem) == 1
    leaf, _ = write_issued(tmp_path, "web", issued)
    bundle = write_bundle(tmp_path, "bundle", ca)

    result = verify(tmp_path, bundle, leaf)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": OK")
    for purpose in ("sslclient", "sslserver"):
        result = verify(tmp_path, bundle, leaf, None, "-purpose", purpose)
        assert result.returncode == 0, f"{purpose}: {result.stderr}"

    san = openssl_ok("x509", "-in", leaf, "-noout", "-ext", "subjectAltName", cwd=tmp_path)
    assert "critical" in san
    assert san.split("\n", 1)[1].strip() == f"URI:{WEB.uri}"
    eku = openssl_ok("x509", "-in", leaf, "-noout", "-ext", "extendedKeyUsage", cwd=tmp_path)
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in eku
    constraints = openssl_ok(
        "x509", "-in", leaf, "-noout", "-ext", "basicConstraints,keyUsage", cwd=tmp_path
    )
    assert "CA:FALSE" in constraints and "Digital Signature" in constraints
    purposes = openssl_ok("x509", "-in", leaf, "-noout", "-purpose", cwd=tmp_path)
    assert "SSL client : Yes" in purposes
    assert "SSL server : Yes" in purposes
    assert "SSL client CA : No" in purposes

    root_text = openssl_ok(
        "x509", "-in", bundle, "-noout", "-subject", "-ext", "keyUsage", cwd=tmp_path
    )
    assert "CN = Meshway Root CA" in root_text and f"O = {TD}" in root_text
    assert "Certificate Sign, CRL Sign" in root_text


def _make_cacerts_with_openssl(directory: Path) -> Path:
    """An RSA root and intermediate made by the openssl CLI, as an operator's PKI would."""
    directory.mkdir()
    openssl_ok(
        "req", "-x509", "-newkey", "rsa:2048", "-noenc", "-sha256", "-days", "30",
        "-subj", "/O=Example Corp/CN=Example Root CA",
        "-keyout", "root-key.pem", "-out", "root-cert.pem",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    openssl_ok(
        "req", "-new", "-newkey", "rsa:2048", "-noenc",
        "-subj", "/O=Example Corp/CN=Meshway Intermediate CA",
        "-keyout", "ca-key.pem", "-out", "ca.csr",
        cwd=directory,
    )  # fmt: skip
    (directory / "ca-ext.cnf").write_text(
        "basicConstraints=critical,CA:TRUE,pathlen:0\n"
        "keyUsage=critical,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid:always\n"
    )
    openssl_ok(
        "x509", "-req", "-in", "ca.csr", "-CA", "root-cert.pem", "-CAkey", "root-key.pem",
        "-set_serial", "4096", "-days", "20", "-sha256", "-extfile", "ca-ext.cnf",
        "-out", "ca-cert.pem",
        cwd=directory,
    )  # fmt: skip
    chain = (directory / "ca-cert.pem").read_text() + (directory / "root-cert.pem").read_text()
    (directory / "cert-chain.pem").write_text(chain)
    return directory


def test_intermediate_from_openssl_pki_signs_openssl_csr(tmp_path: Path) -> None:
    cacerts = _make_cacerts_with_openssl(tmp_path / "cacerts")
    ca = CertificateAuthority.load_or_create(tmp_path / "state", TD, cacerts_dir=cacerts)

    # The requester side generated by openssl too: key and CSR never touch Meshway code.
    openssl_ok("ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", "w.key", cwd=tmp_path)
    openssl_ok(
        "req", "-new", "-key", "w.key", "-subj", "/", "-out", "w.csr",
        "-addext", f"subjectAltName=critical,URI:{WEB.uri}",
        cwd=tmp_path,
    )  # fmt: skip
    issued = ca.sign_csr((tmp_path / "w.csr").read_bytes(), WEB)
    assert len(issued.cert_chain_pem) == 2
    leaf, intermediates = write_issued(tmp_path, "web", issued)
    assert intermediates.read_text() == (cacerts / "ca-cert.pem").read_text()
    bundle = write_bundle(tmp_path, "bundle", ca)
    assert bundle.read_text() == (cacerts / "root-cert.pem").read_text()

    result = verify(tmp_path, bundle, leaf, intermediates, "-purpose", "sslclient")
    assert result.returncode == 0, result.stderr
    # The intermediate is really needed: without it the leaf does not chain to the root.
    assert verify(tmp_path, bundle, leaf).returncode != 0

    leaf_key = openssl_ok("x509", "-in", leaf, "-noout", "-pubkey", cwd=tmp_path)
    assert leaf_key == openssl_ok("pkey", "-in", "w.key", "-pubout", cwd=tmp_path)
    text = openssl_ok("x509", "-in", leaf, "-noout", "-text", cwd=tmp_path)
    assert "Signature Algorithm: sha256WithRSAEncryption" in text
    assert f"URI:{WEB.uri}" in text


def test_one_bundle_trusts_old_and_new_root(tmp_path: Path) -> None:
    old_ca = CertificateAuthority.load_or_create(tmp_path / "old", TD)
    new_ca = CertificateAuthority.load_or_create(
        tmp_path / "new", TD, extra_roots=[tmp_path / "old" / "ca" / "root-cert.pem"]
    )
    bundle = write_bundle(tmp_path, "rotation-bundle", new_ca)
    assert bundle.read_text().count("BEGIN CERTIFICATE") == 2
    old_leaf, _ = write_issued(tmp_path, "old", issue(old_ca))
    new_leaf, _ = write_issued(tmp_path, "new", issue(new_ca, SpiffeId(TD, "prod", "api")))

    for leaf in (old_leaf, new_leaf):
        result = verify(tmp_path, bundle, leaf, None, "-purpose", "sslclient")
        assert result.returncode == 0, f"{leaf.name}: {result.stderr}"
    # Before the rotation, a workload holding only the old root cannot verify the new CA.
    old_only = write_bundle(tmp_path, "old-bundle", old_ca)
    assert verify(tmp_path, old_only, new_leaf).returncode != 0


def test_certificate_from_unrelated_ca_fails(tmp_path: Path) -> None:
    mesh_ca = CertificateAuthority.load_or_create(tmp_path / "mesh", TD)
    other_ca = CertificateAuthority.load_or_create(tmp_path / "other", TD)
    bundle = write_bundle(tmp_path, "bundle", mesh_ca)
    foreign_leaf, _ = write_issued(tmp_path, "foreign", issue(other_ca))

    result = verify(tmp_path, bundle, foreign_leaf)
    assert result.returncode != 0
    assert "unable to get local issuer certificate" in result.stdout + result.stderr


def test_serving_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "state", TD)
    chain_pem, key_pem = ca.issue_serving_certificate(
        ["meshway-controlplane.local"], [ipaddress.ip_address("127.0.0.1")]
    )
    leaf = tmp_path / "serving.pem"
    leaf.write_bytes(chain_pem)
    (tmp_path / "serving.key").write_bytes(key_pem)
    bundle = write_bundle(tmp_path, "bundle", ca)

    ok = verify(tmp_path, bundle, leaf, None, "-purpose", "sslserver", "-verify_ip", "127.0.0.1")
    assert ok.returncode == 0, ok.stderr
    ok = verify(tmp_path, bundle, leaf, None, "-verify_hostname", "meshway-controlplane.local")
    assert ok.returncode == 0, ok.stderr
    assert verify(tmp_path, bundle, leaf, None, "-verify_hostname", "evil.local").returncode != 0
    # serverAuth only: the control plane's certificate is not a client identity.
    assert verify(tmp_path, bundle, leaf, None, "-purpose", "sslclient").returncode != 0

    san = openssl_ok("x509", "-in", leaf, "-noout", "-ext", "subjectAltName", cwd=tmp_path)
    assert "DNS:meshway-controlplane.local, IP Address:127.0.0.1" in san
    cert_key = openssl_ok("x509", "-in", leaf, "-noout", "-pubkey", cwd=tmp_path)
    assert cert_key == openssl_ok("pkey", "-in", "serving.key", "-pubout", cwd=tmp_path)
