"""Certificate provisioning (`phalanx.pki`): real files in a temporary directory, read back and checked."""

from __future__ import annotations

import base64
import ipaddress
import os
import ssl
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from phalanx import pki
from phalanx.identity import identity_of

REPO = Path(__file__).resolve().parent.parent
SITES = ("site-a", "site-b", "site-c")
PROVISION = ("--sites", ",".join(SITES), "--hosts", "coord.example,10.0.0.5")


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = pki.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(directory: Path) -> dict[str, tuple[bytes, int, int]]:
    """Each file's content, mode and modification time."""
    files = {}
    for path in directory.iterdir():
        status = path.stat()
        files[path.name] = (path.read_bytes(), status.st_mode, status.st_mtime_ns)
    return files


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def subject(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(attribute.value) for attribute in cert.subject.get_attributes_for_oid(oid)]


def sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """The certificate's DNS and IP address SANs, in order."""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def make_request(
    name: str, names: list[x509.GeneralName], key: ec.EllipticCurvePrivateKey | None = None
) -> tuple[x509.CertificateSigningRequest, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()), key


def write_request(path: Path, der: bytes) -> Path:
    body = base64.encodebytes(der).decode()
    path.write_text(f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n")
    return path


@pytest.fixture
def federation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp_path / "certs"
    code, _, err = run(capsys, "--out", out, *PROVISION)
    assert code == 0, err
    return out


def test_provisioning_writes_the_federation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new" / "certs"
    code, stdout, _ = run(capsys, "--out", out, *PROVISION)
    assert code == 0
    parties = ("ca", "coordinator", "admin", *SITES)
    expected = {f"{name}.{suffix}" for name in parties for suffix in ("pem", "key")}
    assert {path.name for path in out.iterdir()} == expected
    assert {Path(line).name for line in stdout.splitlines()} == expected
    for name in parties:
        assert stat.S_IMODE((out / f"{name}.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((out / f"{name}.pem").stat().st_mode) == 0o644

    ca = load_cert(out / "ca.pem")
    assert ca.subject.rfc4514_string() == "CN=Phalanx CA,O=Phalanx"
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert load_key(out / "ca.key").public_key() == ca.public_key()

    for name, role in [("coordinator", "coordinator"), *((site, "site") for site in SITES)]:
        leaf = load_cert(out / f"{name}.pem")
        leaf.verify_directly_issued_by(ca)
        assert load_key(out / f"{name}.key").public_key() == leaf.public_key()
        assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
        assert leaf.public_key().curve.name == "secp256r1"
        assert subject(leaf, NameOID.COMMON_NAME) == [name]
        assert subject(leaf, NameOID.ORGANIZATIONAL_UNIT_NAME) == [role]
        assert subject(leaf, NameOID.ORGANIZATION_NAME) == ["Phalanx"]
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
        assert constraints.critical and not constraints.value.ca
        assert leaf.extensions.get_extension_for_class(x509.KeyUsage).critical
        assert leaf.not_valid_after_utc <= ca.not_valid_after_utc

    assert sans(load_cert(out / "coordinator.pem")) == (["coord.example"], ["10.0.0.5"])
    for site in SITES:
        identity = f"{site}.site.phalanx.invalid"
        assert sans(load_cert(out / f"{site}.pem")) == (["localhost", identity], ["127.0.0.1"])


def test_provisioning_issues_an_admin_certificate(federation: Path) -> None:
    ca = load_cert(federation / "ca.pem")
    assert stat.S_IMODE((federation / "admin.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((federation / "admin.pem").stat().st_mode) == 0o644
    leaf = load_cert(federation / "admin.pem")
    leaf.verify_directly_issued_by(ca)
    assert load_key(federation / "admin.key").public_key() == leaf.public_key()
    assert leaf.subject.rfc4514_string() == "CN=admin,OU=admin,O=Phalanx"
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.not_valid_after_utc <= ca.not_valid_after_utc
    identity = identity_of((federation / "admin.pem").read_bytes())
    assert (identity.name, identity.role, identity.hosts) == ("admin", pki.ROLE_ADMIN, frozenset())


def test_admin_certificate_is_a_tls_client_of_the_coordinator(federation: Path) -> None:
    _connect(federation, "coordinator", "admin", "coord.example")


def test_provisioning_again_is_refused_and_changes_nothing(
    federation: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(federation)
    code, stdout, err = run(capsys, "--out", federation, "--sites", "site-x")
    assert code == 2 and stdout == ""
    assert "--add-site" in err and "ca.pem" in err
    assert snapshot(federation) == before


def test_add_site_signs_with_the_existing_ca(federation: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = load_cert(federation / "ca.pem")
    code, stdout, _ = run(capsys, "--out", federation, "--add-site", "site-d", "--site-hosts", "d.example")
    assert code == 0
    assert [Path(line).name for line in stdout.splitlines()] == ["site-d.key", "site-d.pem"]
    leaf = load_cert(federation / "site-d.pem")
    leaf.verify_directly_issued_by(ca)
    assert sans(leaf) == (["d.example", "site-d.site.phalanx.invalid"], [])
    assert stat.S_IMODE((federation / "site-d.key").stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["site-a", "SITE-A"])
def test_add_site_refuses_a_taken_name(
    federation: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    before = snapshot(federation)
    code, _, err = run(capsys, "--out", federation, "--add-site", name)
    assert code == 2 and "already exists" in err
    assert snapshot(federation) == before


def test_add_admin_issues_another_admin(federation: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = load_cert(federation / "ca.pem")
    code, stdout, err = run(capsys, "--out", federation, "--add-admin", "ops-1", "--days", "30")
    assert code == 0, err
    assert [Path(line).name for line in stdout.splitlines()] == ["ops-1.key", "ops-1.pem"]
    assert stat.S_IMODE((federation / "ops-1.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((federation / "ops-1.pem").stat().st_mode) == 0o644
    leaf = load_cert(federation / "ops-1.pem")
    leaf.verify_directly_issued_by(ca)
    assert load_key(federation / "ops-1.key").public_key() == leaf.public_key()
    assert leaf.subject.rfc4514_string() == "CN=ops-1,OU=admin,O=Phalanx"
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= timedelta(days=30, minutes=5)
    identity = identity_of((federation / "ops-1.pem").read_bytes())
    assert (identity.name, identity.role, identity.hosts) == ("ops-1", "admin", frozenset())
    assert load_cert(federation / "admin.pem").serial_number != leaf.serial_number
    _connect(federation, "coordinator", "ops-1", "coord.example")


@pytest.mark.parametrize("name", ["site-a", "SITE-A", "Coordinator", "admin"])
def test_add_admin_refuses_a_taken_or_reserved_name(
    federation: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    before = snapshot(federation)
    code, stdout, err = run(capsys, "--out", federation, "--add-admin", name)
    assert code == 2 and stdout == "" and repr(name) in err
    assert snapshot(federation) == before


def test_admins_and_sites_share_one_namespace(federation: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert pki.add_admin(federation, "ops-1") == [federation / "ops-1.key", federation / "ops-1.pem"]
    before = snapshot(federation)
    for option, name in [("--add-admin", "ops-1"), ("--add-admin", "OPS-1"), ("--add-site", "Ops-1")]:
        code, _, err = run(capsys, "--out", federation, option, name)
        assert code == 2 and "already exists" in err
    assert snapshot(federation) == before


def test_add_admin_needs_a_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--out", tmp_path, "--add-admin", "ops-1")
    assert code == 2 and "no CA" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--hosts", "--site-hosts"])
def test_add_admin_refuses_host_options(
    federation: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    before = snapshot(federation)
    with pytest.raises(SystemExit) as exit_info:
        pki.main(["--out", str(federation), "--add-admin", "ops-1", option, "x.example"])
    assert exit_info.value.code == 2
    assert f"{option} does not apply to --add-admin" in capsys.readouterr().err
    assert snapshot(federation) == before


def test_add_site_needs_the_ca_key(federation: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (federation / "ca.key").unlink()
    code, _, err = run(capsys, "--out", federation, "--add-site", "site-d")
    assert code == 2 and "ca.key" in err
    assert not (federation / "site-d.pem").exists() and not (federation / "site-d.key").exists()


def test_add_site_refuses_an_expired_ca(tmp_path: Path) -> None:
    authority = pki.new_authority(1, now=datetime.now(timezone.utc) - timedelta(days=2))
    pki.write_cert(tmp_path / "ca.pem", authority.cert)
    pki.write_key(tmp_path / "ca.key", authority.key)
    with pytest.raises(pki.PkiError, match="expired"):
        pki.add_site(tmp_path, "site-d")


def test_csr_flow_keeps_the_site_key_on_the_site(
    federation: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site_dir = tmp_path / "site-e"
    hosts = "e.example,10.0.0.7"
    code, stdout, _ = run(capsys, "--out", site_dir, "--make-csr", "site-e", "--site-hosts", hosts)
    assert code == 0
    assert [Path(line).name for line in stdout.splitlines()] == ["site-e.key", "site-e.csr"]
    assert stat.S_IMODE((site_dir / "site-e.key").stat().st_mode) == 0o600
    site_key = load_key(site_dir / "site-e.key")

    code, stdout, _ = run(capsys, "--out", federation, "--sign-csr", site_dir / "site-e.csr", "--days", "30")
    assert code == 0 and stdout.strip() == str(federation / "site-e.pem")
    cert = load_cert(federation / "site-e.pem")
    cert.verify_directly_issued_by(load_cert(federation / "ca.pem"))
    assert cert.public_key() == site_key.public_key()
    assert subject(cert, NameOID.COMMON_NAME) == ["site-e"]
    assert subject(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == ["site"]
    assert sans(cert) == (["e.example", "site-e.site.phalanx.invalid"], ["10.0.0.7"])
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= timedelta(days=30, minutes=5)
    assert not (federation / "site-e.key").exists()
    secret = pki.key_pem(site_key)
    assert all(secret not in path.read_bytes() for path in federation.iterdir())

    code, _, err = run(capsys, "--out", federation, "--sign-csr", site_dir / "site-e.csr")
    assert code == 2 and "already exists" in err


def test_sign_csr_sets_the_extensions_itself(federation: Path, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-f")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "site-f.csr"
    path.write_bytes(request.public_bytes(serialization.Encoding.PEM))
    cert = load_cert(pki.sign_csr(federation, path))
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert sans(cert) == (["site-f.site.phalanx.invalid"], [])


@pytest.mark.parametrize(
    "requested",
    [
        x509.DNSName("site-a.site.phalanx.invalid"),
        x509.DNSName("Other.INVALID"),
        x509.DNSName("*.example.com"),
        x509.DNSName("bad_host.example"),
        x509.UniformResourceIdentifier("https://example.com"),
    ],
)
def test_sign_csr_refuses_bad_sans(federation: Path, tmp_path: Path, requested: x509.GeneralName) -> None:
    request, _ = make_request("site-g", [x509.DNSName("g.example"), requested])
    path = write_request(tmp_path / "site-g.csr", request.public_bytes(serialization.Encoding.DER))
    with pytest.raises(pki.PkiError):
        pki.sign_csr(federation, path)
    assert not (federation / "site-g.pem").exists()


def test_sign_csr_refuses_a_tampered_request(federation: Path, tmp_path: Path) -> None:
    request, _ = make_request("site-x", [x509.DNSName("x.example")])
    der = request.public_bytes(serialization.Encoding.DER)
    assert der.count(b"site-x") == 1
    path = write_request(tmp_path / "site-y.csr", der.replace(b"site-x", b"site-y"))
    with pytest.raises(pki.PkiError, match="signature"):
        pki.sign_csr(federation, path)
    assert not (federation / "site-y.pem").exists() and not (federation / "site-x.pem").exists()


@pytest.mark.parametrize("name", ["coordinator", "CA", "a/b"])
def test_sign_csr_refuses_a_bad_common_name(
    federation: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    before = snapshot(federation)
    request, _ = make_request(name, [])
    path = write_request(tmp_path / "request.csr", request.public_bytes(serialization.Encoding.DER))
    code, _, err = run(capsys, "--out", federation, "--sign-csr", path)
    assert code == 2 and repr(name) in err
    assert snapshot(federation) == before


def test_sign_csr_refuses_garbage(federation: Path, tmp_path: Path) -> None:
    path = tmp_path / "garbage.csr"
    path.write_text("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(pki.PkiError, match="not a well-formed"):
        pki.sign_csr(federation, path)


BAD_NAMES = ["", "x" * 65, "a/b", "a\nb", "\x1b[31m", "coordinator", "Admin", ".hidden", "-x", "a..b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_site_names_are_refused(
    federation: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    fresh = tmp_path / "fresh"
    before = snapshot(federation)
    attempts = (
        ["--out", fresh, f"--sites={name}"],
        ["--out", federation, f"--add-site={name}"],
        ["--out", federation, f"--add-admin={name}"],
    )
    for args in attempts:
        code, stdout, err = run(capsys, *args)
        assert code == 2 and stdout == ""
        assert err.endswith("\n") and err.count("\n") == 1
        assert "\x1b" not in err and "\r" not in err
        assert len(err) < 200
    assert not fresh.exists()
    assert snapshot(federation) == before
    with pytest.raises(pki.PkiError):
        pki.check_site_name(name)


@pytest.mark.parametrize("name", ["a", "site-1", "Site_2.eu", "x" * 64])
def test_good_site_names(name: str) -> None:
    assert pki.check_site_name(name) == name
    assert pki.site_san(name) == name + pki.SITE_SAN_SUFFIX


@pytest.mark.parametrize(
    "hosts", ["*.example.com", "evil.site.phalanx.invalid", "a b", "example.com,", "1.2.3", "x" * 300]
)
def test_bad_hosts_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], hosts: str) -> None:
    out = tmp_path / "certs"
    for option in ("--hosts", "--site-hosts"):
        code, _, err = run(capsys, "--out", out, "--sites", "site-a", option, hosts)
        assert code == 2 and "bad host" in err and len(err) < 200
    assert not out.exists()


def test_options_that_do_not_apply_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        pki.main(["--out", str(tmp_path), "--sign-csr", "x.csr", "--site-hosts", "x.example"])
    assert exit_info.value.code == 2
    assert "--site-hosts does not apply to --sign-csr" in capsys.readouterr().err


def test_issue_can_make_an_expired_certificate() -> None:
    authority = pki.new_authority()
    past = datetime.now(timezone.utc) - timedelta(days=1)
    cert, key = pki.issue(
        authority, "site-a", pki.ROLE_SITE, ["localhost"], not_before=past - timedelta(days=1), not_after=past
    )
    assert cert.not_valid_after_utc < datetime.now(timezone.utc)
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(authority.cert)


def test_write_key_never_overwrites(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "k.key"
    pki.write_key(path, key)
    with pytest.raises(FileExistsError):
        pki.write_key(path, ec.generate_private_key(ec.SECP256R1()))
    assert path.read_bytes() == pki.key_pem(key)


def _handshake(
    client: ssl.SSLObject, server: ssl.SSLObject, pipes: list[tuple[ssl.MemoryBIO, ssl.MemoryBIO]]
) -> None:
    """Drive a TLS handshake between two in-memory endpoints until both finish (or one raises)."""
    pending = {client, server}
    for _ in range(10):
        for endpoint in list(pending):
            try:
                endpoint.do_handshake()
                pending.discard(endpoint)
            except ssl.SSLWantReadError:
                pass
            for source, sink in pipes:
                sink.write(source.read())
        if not pending:
            return
    raise AssertionError("handshake did not finish")


def _connect(certs: Path, server_name: str, client_name: str, target: str) -> None:
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(certs / f"{server_name}.pem", certs / f"{server_name}.key")
    server_context.load_verify_locations(certs / "ca.pem")
    server_context.verify_mode = ssl.CERT_REQUIRED
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.load_cert_chain(certs / f"{client_name}.pem", certs / f"{client_name}.key")
    client_context.load_verify_locations(certs / "ca.pem")
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    from_client, from_server = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(to_client, from_client, server_hostname=target)
    server = server_context.wrap_bio(to_server, from_server, server_side=True)
    _handshake(client, server, [(from_client, to_server), (from_server, to_client)])


def test_tls_proves_the_site_identity(federation: Path) -> None:
    _connect(federation, "site-a", "coordinator", pki.site_san("site-a"))
    _connect(federation, "coordinator", "site-a", "coord.example")
    with pytest.raises(ssl.SSLCertVerificationError):
        _connect(federation, "site-b", "coordinator", pki.site_san("site-a"))


def test_module_entry_point_help() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "phalanx.pki", "--help"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    modes = ("--sites", "--add-site", "--add-admin", "--make-csr", "--sign-csr")
    for option in (*modes, "--hosts", "--site-hosts", "--days"):
        assert option in result.stdout


def test_ip_hosts_become_ip_sans(tmp_path: Path) -> None:
    pki.provision(tmp_path, ["site-a"], ["::1", "coord.example"], site_hosts=["10.1.2.3"])
    coordinator = load_cert(tmp_path / "coordinator.pem")
    san = coordinator.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]
    assert san.get_values_for_type(x509.DNSName) == ["coord.example"]
    assert sans(load_cert(tmp_path / "site-a.pem")) == (["site-a.site.phalanx.invalid"], ["10.1.2.3"])
