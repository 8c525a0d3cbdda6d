"""Certificates for a federation: one private CA and the certificates of its coordinator, sites and admins.

Everything here uses the `cryptography` package: EC P-256 keys, SHA-256 signatures. The CA
(`CN=Phalanx CA, O=Phalanx`, path length 0) signs only leaf certificates. A coordinator or site
leaf carries both the server and the client auth EKU: sites serve TrainerService and call the
coordinator, the coordinator serves and calls the sites. An admin leaf, held by an operator who
calls a serving coordinator's admin API, carries only the client auth EKU and no SAN: it is
never a server, so no host names it. Validity starts five minutes in the past (clock skew) and
never outlasts the CA.

File layout of an operator's directory (`--out DIR`):

    DIR/ca.pem                         CA certificate: the trust anchor every party gets
    DIR/ca.key                         CA private key: stays with the operator
    DIR/coordinator.pem, .key          the coordinator's certificate and key
    DIR/admin.pem, DIR/admin.key       the first admin's certificate and key (an operator's client)
    DIR/<site>.pem, DIR/<site>.key     a site's certificate and key (no .key for a CSR-signed site)
    DIR/<admin>.pem, DIR/<admin>.key   a further admin's certificate and key (`--add-admin`)

Keys are unencrypted PKCS8 PEM, created with mode 0600 and never overwritten; certificates
and CSRs are 0644.

Identity rules: a leaf's subject is `CN=<name>, OU=<role>, O=Phalanx`, the role being
"coordinator", "site" or "admin" (`phalanx.identity.identity_of` reads both back). A site
certificate also carries the identity SAN `DNS:<name>.site.phalanx.invalid` (`site_san`),
besides its host SANs; the coordinator dials a site with `grpc.ssl_target_name_override` set
to it, so the TLS handshake proves the server holds that site's certificate. The `.invalid`
TLD is reserved, so no real host collides, and no host SAN may end in it. Site names are 1-64
characters of A-Z a-z 0-9 . _ -, not starting with "." or "-", with no empty part between dots
(the identity SAN must be a DNS name); "coordinator", "ca" and "admin" are reserved, and two
sites may not differ only in letter case (DNS names match case-insensitively). An admin added
with `--add-admin` follows the same name rules; sites and admins share one namespace in DIR,
so no name may already have a certificate there, in any letter case.

Workflows:

    # 1. The operator provisions a federation, with one admin certificate admin.pem/.key
    #    (refused if DIR already holds a CA):
    python -m phalanx.pki --out certs --sites site-a,site-b,site-c --hosts coord.example,10.0.0.5

    # 2. The operator adds a site to it later, with the same CA:
    python -m phalanx.pki --out certs --add-site site-d --site-hosts site-d.example

    # 3. A site keeps its own key: it makes a CSR, the operator signs it, the site gets site-e.pem back.
    python -m phalanx.pki --out site-e-certs --make-csr site-e --site-hosts site-e.example   # on the site
    python -m phalanx.pki --out certs --sign-csr site-e.csr                                # by the operator

    # 4. The operator issues another admin certificate (ops-1.pem/.key) with the same CA:
    python -m phalanx.pki --out certs --add-admin ops-1
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "ADMIN_NAME",
    "COORDINATOR_NAME",
    "DEFAULT_DAYS",
    "DEFAULT_HOSTS",
    "DEFAULT_SITE_HOSTS",
    "MAX_DAYS",
    "ROLES",
    "ROLE_ADMIN",
    "ROLE_COORDINATOR",
    "ROLE_SITE",
    "SITE_NAME_RE",
    "SITE_SAN_SUFFIX",
    "Authority",
    "PkiError",
    "add_admin",
    "add_site",
    "cert_pem",
    "check_host",
    "check_site_name",
    "issue",
    "key_pem",
    "load_authority",
    "main",
    "make_csr",
    "new_authority",
    "provision",
    "sign_csr",
    "site_san",
    "write_cert",
    "write_key",
]

SITE_SAN_SUFFIX = ".site.phalanx.invalid"
ROLE_COORDINATOR = "coordinator"
ROLE_SITE = "site"
ROLE_ADMIN = "admin"
ROLES = (ROLE_COORDINATOR, ROLE_SITE, ROLE_ADMIN)
COORDINATOR_NAME = "coordinator"
ADMIN_NAME = "admin"
"""The name of the admin certificate that `provision` issues."""
RESERVED_NAMES = frozenset({COORDINATOR_NAME, "ca", ADMIN_NAME})
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_SITE_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 365
MAX_DAYS = 3650
CLOCK_SKEW = timedelta(minutes=5)
MAX_CSR_BYTES = 64 * 1024

ORGANIZATION = "Phalanx"
CA_COMMON_NAME = "Phalanx CA"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
KEY_MODE = 0o600
PUBLIC_MODE = 0o644

SITE_NAME_RE = re.compile(r"(?=.{1,64}\Z)[A-Za-z0-9_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*\Z")
"""A site name: 1-64 of A-Z a-z 0-9 . _ -, not starting with "." or "-", no empty part between dots."""

_DNS_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_MAX_DNS_CHARS = 253
_SHOWN_CHARS = 64
_SHOWN_REPR_CHARS = 80

_Files = dict[Path, tuple[bytes, int]]
"""Files to write: path to (content, mode)."""


class PkiError(ValueError):
    """A name, host, CSR, CA or output directory is unacceptable; the message is bounded and escaped."""


@dataclass(frozen=True)
class Authority:
    """The federation's CA: its certificate and private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _show(value: str) -> str:
    """`value` quoted and escaped with repr(), cut to a bounded length: safe in messages."""
    shown = repr(value[:_SHOWN_CHARS])
    if len(value) > _SHOWN_CHARS or len(shown) > _SHOWN_REPR_CHARS:
        return shown[:_SHOWN_REPR_CHARS] + "..."
    return shown


def check_site_name(name: str) -> str:
    """Return `name` if it is an acceptable site name, else raise PkiError."""
    if not SITE_NAME_RE.match(name):
        raise PkiError(
            f"bad site name {_show(name)}: use 1-64 characters A-Z a-z 0-9 . _ -; "
            "no leading . or -, no '..' or trailing ."
        )
    if name.lower() in RESERVED_NAMES:
        raise PkiError(f"site name {_show(name)} is reserved")
    return name


def site_san(name: str) -> str:
    """The identity SAN (a DNS name) that the certificate of site `name` carries."""
    return check_site_name(name) + SITE_SAN_SUFFIX


def _general_name(host: str) -> x509.GeneralName:
    """The SAN entry for `host`: IPAddress if it parses as one, else a checked DNSName."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return x509.DNSName(_check_dns_name(host))
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise PkiError(f"bad host {_show(host)}: a certificate cannot name an IPv6 scope")
    return x509.IPAddress(address)


def _check_dns_name(host: str) -> str:
    labels = host.split(".")
    if len(host) > _MAX_DNS_CHARS or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
        raise PkiError(f"bad host {_show(host)}: not an IP address or a DNS name of A-Z a-z 0-9 - labels")
    if labels[-1].isdigit():
        raise PkiError(f"bad host {_show(host)}: not an IP address, and a DNS name cannot end in a number")
    if labels[-1].lower() == "invalid":
        raise PkiError(f"bad host {_show(host)}: names in .invalid are reserved for site identities")
    return host


def check_host(host: str) -> str:
    """Return `host` if a certificate may name it (an IP address or a DNS name), else raise PkiError."""
    _general_name(host)
    return host


def _check_name(name: str) -> str:
    if not SITE_NAME_RE.match(name):
        raise PkiError(f"bad name {_show(name)}: use 1-64 characters A-Z a-z 0-9 . _ -")
    return name


def _check_days(days: int) -> int:
    if not 1 <= days <= MAX_DAYS:
        raise PkiError(f"days must be between 1 and {MAX_DAYS}, got {days}")
    return days


def _check_distinct(names: Sequence[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name.lower() in seen:
            raise PkiError(f"site {_show(name)} is listed twice (names match case-insensitively)")
        seen.add(name.lower())


def _subject(name: str, role: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a leaf signs its TLS handshakes."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def new_authority(days: int = DEFAULT_DAYS, *, now: datetime | None = None) -> Authority:
    """A fresh CA valid for `days` from five minutes before `now` (default: the current time)."""
    _check_days(days)
    now = now if now is not None else datetime.now(timezone.utc)
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
        ]
    )
    usage = _key_usage(ca=True)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def load_authority(directory: Path) -> Authority:
    """The CA in `directory` (ca.pem and ca.key); raise PkiError if missing or unusable."""
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    missing = [path.name for path in (cert_path, key_path) if not path.is_file()]
    if missing:
        raise PkiError(f"no CA in {directory}: {' and '.join(missing)} missing (provision one with --sites)")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.ExtensionNotFound) as exc:
        raise PkiError(f"cannot use the CA in {directory}: {type(exc).__name__}") from exc
    if not constraints.ca:
        raise PkiError(f"{cert_path} is not a CA certificate")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise PkiError(f"{key_path} is not the private key of {cert_path}")
    return Authority(cert, key)


def _leaf_names(name: str, role: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    """The checked SANs of a leaf: its hosts, and for a site its identity SAN; no duplicates.

    A leaf may have none (an admin's: a client only); `_certify` then leaves out the SAN extension.
    """
    if role not in ROLES:
        raise PkiError(f"role must be one of {', '.join(ROLES)}, got {_show(role)}")
    names = [_general_name(host) for host in hosts]
    if role == ROLE_SITE:
        names.append(x509.DNSName(site_san(name)))
    else:
        _check_name(name)
    return list(dict.fromkeys(names))


def _validity(
    authority: Authority, days: int, not_before: datetime | None, not_after: datetime | None
) -> tuple[datetime, datetime]:
    """A leaf's validity: the given bounds, else from five minutes ago for `days`, cut at the CA's end."""
    now = datetime.now(timezone.utc)
    start = not_before if not_before is not None else now - CLOCK_SKEW
    if not_after is None:
        ca_end = authority.cert.not_valid_after_utc
        if ca_end <= now:
            raise PkiError(f"the CA certificate expired at {ca_end:%Y-%m-%d %H:%M} UTC")
        not_after = min(now + timedelta(days=_check_days(days)), ca_end)
    if not_after <= start:
        raise PkiError("a certificate's validity must end after it starts")
    return start, not_after


def _certify(
    authority: Authority,
    name: str,
    role: str,
    names: list[x509.GeneralName],
    public_key: ec.EllipticCurvePublicKey,
    validity: tuple[datetime, datetime],
) -> x509.Certificate:
    usage = _key_usage(ca=False)
    ca_key_id = authority.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id)
    if role == ROLE_ADMIN:  # an operator's client: never a server
        auths = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    else:
        auths = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(name, role))
        .issuer_name(authority.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(auths, critical=False)
        .add_extension(authority_key_id, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(authority.key, hashes.SHA256())


def issue(
    authority: Authority,
    name: str,
    role: str,
    hosts: Sequence[str],
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    days: int = DEFAULT_DAYS,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate for `name` in `role`, valid for `hosts` (a site also gets its identity SAN).

    `hosts` may be empty: the certificate then has no SAN extension (right for an admin, a client only).

    `key` None makes a fresh key. The validity is from five minutes ago for `days`, cut at the
    CA's end, unless `not_before` / `not_after` (timezone-aware) give it.
    """
    names = _leaf_names(name, role, hosts)
    validity = _validity(authority, days, not_before, not_after)
    key = key if key is not None else _new_key()
    return _certify(authority, name, role, names, key.public_key(), validity), key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from the start (never replacing a file) and write `data`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # exact mode whatever the umask
        with os.fdopen(fd, "wb", closefd=False) as file:
            file.write(data)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write `key` as PKCS8 PEM to a new file of mode 0600 (FileExistsError if it exists)."""
    _write_new(path, key_pem(key), KEY_MODE)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    """Write `cert` as PEM to a new file of mode 0644 (FileExistsError if it exists)."""
    _write_new(path, cert_pem(cert), PUBLIC_MODE)


def _leaf_files(out: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> _Files:
    return {out / f"{name}.key": (key_pem(key), KEY_MODE), out / f"{name}.pem": (cert_pem(cert), PUBLIC_MODE)}


def _write_files(out: Path, files: _Files) -> list[Path]:
    """Write all `files` into `out` (created 0700 if missing), or none if any exists already."""
    existing = [path for path in files if path.exists()]
    if existing:
        raise PkiError(f"{existing[0]} already exists; nothing was written")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path, (data, mode) in files.items():
        _write_new(path, data, mode)
    return list(files)


def _refuse_taken(out: Path, name: str) -> None:
    """Refuse a site or admin name that already has a certificate in `out`, in any letter case."""
    for path in out.glob("*.pem"):
        if path.stem.lower() == name.lower():
            raise PkiError(f"{path} already exists: {_show(name)} already has a certificate")


def provision(
    out: Path,
    sites: Sequence[str],
    hosts: Sequence[str],
    site_hosts: Sequence[str] = DEFAULT_SITE_HOSTS,
    days: int = DEFAULT_DAYS,
) -> list[Path]:
    """Create a CA, a coordinator certificate for `hosts`, one certificate per site and one admin in `out`.

    The admin certificate is `out/admin.pem` (`CN=admin, OU=admin`, client auth only, no SAN).

    Everything is checked before anything is written; refused if `out` already holds a CA.
    """
    if (out / CA_CERT_FILE).exists():
        raise PkiError(f"{out / CA_CERT_FILE} already exists: use --add-site to add a site to it")
    if not hosts:
        raise PkiError("the coordinator needs at least one host")
    for site in sites:
        check_site_name(site)
    _check_distinct(sites)
    authority = new_authority(days)
    files: _Files = {
        out / CA_KEY_FILE: (key_pem(authority.key), KEY_MODE),
        out / CA_CERT_FILE: (cert_pem(authority.cert), PUBLIC_MODE),
    }
    cert, key = issue(authority, COORDINATOR_NAME, ROLE_COORDINATOR, hosts, days=days)
    files.update(_leaf_files(out, COORDINATOR_NAME, cert, key))
    for site in sites:
        cert, key = issue(authority, site, ROLE_SITE, site_hosts, days=days)
        files.update(_leaf_files(out, site, cert, key))
    cert, key = issue(authority, ADMIN_NAME, ROLE_ADMIN, (), days=days)
    files.update(_leaf_files(out, ADMIN_NAME, cert, key))
    return _write_files(out, files)


def add_site(
    out: Path, name: str, site_hosts: Sequence[str] = DEFAULT_SITE_HOSTS, days: int = DEFAULT_DAYS
) -> list[Path]:
    """Issue a key and certificate for one more site with the CA in `out`."""
    check_site_name(name)
    authority = load_authority(out)
    _refuse_taken(out, name)
    cert, key = issue(authority, name, ROLE_SITE, site_hosts, days=days)
    return _write_files(out, _leaf_files(out, name, cert, key))


def add_admin(out: Path, name: str, days: int = DEFAULT_DAYS) -> list[Path]:
    """Issue a key and an admin certificate (client auth only, no SAN) for `name` with the CA in `out`.

    `name` follows the site name rules and must not have a certificate in `out` yet (site or admin).
    """
    check_site_name(name)
    authority = load_authority(out)
    _refuse_taken(out, name)
    cert, key = issue(authority, name, ROLE_ADMIN, (), days=days)
    return _write_files(out, _leaf_files(out, name, cert, key))


def make_csr(out: Path, name: str, site_hosts: Sequence[str] = DEFAULT_SITE_HOSTS) -> list[Path]:
    """On a site: write a new key `out/<name>.key` and a CSR `out/<name>.csr` (CN=name, SANs=site_hosts)."""
    check_site_name(name)
    names = [_general_name(host) for host in site_hosts]
    key = _new_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    files: _Files = {
        out / f"{name}.key": (key_pem(key), KEY_MODE),
        out / f"{name}.csr": (csr.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE),
    }
    return _write_files(out, files)


_MALFORMED = (ValueError, UnsupportedAlgorithm, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


def _read_csr(path: Path) -> tuple[str, list[str], ec.EllipticCurvePublicKey]:
    """The site name, hosts and public key a CSR asks for, each checked; raise PkiError otherwise."""
    with path.open("rb") as file:
        data = file.read(MAX_CSR_BYTES + 1)
    if len(data) > MAX_CSR_BYTES:
        raise PkiError(f"{path} is larger than {MAX_CSR_BYTES} bytes: not a CSR")
    try:
        csr = x509.load_pem_x509_csr(data)
        signature_ok = csr.is_signature_valid
        public_key = csr.public_key()
        common_names = [attr.value for attr in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        requested = _requested_names(csr)
    except _MALFORMED as exc:
        raise PkiError(f"{path} is not a well-formed PEM CSR ({type(exc).__name__})") from exc
    if not signature_ok:
        raise PkiError(f"{path}: the CSR's signature does not verify")
    if not (isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1)):
        raise PkiError(f"{path}: the CSR's key is not an EC P-256 key")
    if len(common_names) != 1 or not isinstance(common_names[0], str):
        raise PkiError(f"{path}: the CSR's subject must hold exactly one common name")
    return check_site_name(common_names[0]), [_requested_host(entry) for entry in requested], public_key


def _requested_names(csr: x509.CertificateSigningRequest) -> list[x509.GeneralName]:
    try:
        return list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _requested_host(entry: x509.GeneralName) -> str:
    if isinstance(entry, x509.DNSName | x509.IPAddress):
        return check_host(str(entry.value))
    raise PkiError(f"the CSR asks for a {type(entry).__name__} SAN; only DNS and IP address SANs are allowed")


def sign_csr(out: Path, csr_path: Path, days: int = DEFAULT_DAYS) -> Path:
    """Sign a site's CSR with the CA in `out`, writing `out/<name>.pem`; the operator sets every extension."""
    name, hosts, public_key = _read_csr(csr_path)
    authority = load_authority(out)
    _refuse_taken(out, name)
    names = _leaf_names(name, ROLE_SITE, hosts)
    cert = _certify(authority, name, ROLE_SITE, names, public_key, _validity(authority, days, None, None))
    path = out / f"{name}.pem"
    _write_files(out, {path: (cert_pem(cert), PUBLIC_MODE)})
    return path


# Which of --hosts, --site-hosts and --days each mode takes.
_MODE_OPTIONS: dict[str, frozenset[str]] = {
    "sites": frozenset({"hosts", "site_hosts", "days"}),
    "add_site": frozenset({"site_hosts", "days"}),
    "add_admin": frozenset({"days"}),
    "make_csr": frozenset({"site_hosts"}),
    "sign_csr": frozenset({"days"}),
}


def _days_argument(text: str) -> int:
    try:
        return _check_days(int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"days must be an integer from 1 to {MAX_DAYS}") from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m phalanx.pki",
        description="Provision the CA and the TLS certificates of a Phalanx federation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out", required=True, default=argparse.SUPPRESS, metavar="DIR", help="directory holding the files"
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--sites",
        default=argparse.SUPPRESS,
        help="comma-separated site names: create a new CA, the coordinator's and these sites' certificates",
    )
    mode.add_argument(
        "--add-site", default=argparse.SUPPRESS, metavar="NAME", help="issue one more site with the CA in DIR"
    )
    mode.add_argument(
        "--add-admin",
        default=argparse.SUPPRESS,
        metavar="NAME",
        help="issue one more admin certificate (an operator's client) with the CA in DIR",
    )
    mode.add_argument(
        "--make-csr",
        default=argparse.SUPPRESS,
        metavar="NAME",
        help="on a site: write NAME.key and a certificate signing request NAME.csr for the operator",
    )
    mode.add_argument(
        "--sign-csr",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="sign a site's CSR with the CA in DIR, writing DIR/NAME.pem (NAME: the CSR's common name)",
    )
    parser.add_argument(
        "--hosts",
        default=",".join(DEFAULT_HOSTS),
        help="with --sites: comma-separated DNS names and IP addresses the coordinator is reached at",
    )
    parser.add_argument(
        "--site-hosts",
        default=",".join(DEFAULT_SITE_HOSTS),
        help="comma-separated DNS names and IP addresses of the site(s), for --sites, --add-site, --make-csr",
    )
    parser.add_argument(
        "--days",
        type=_days_argument,
        default=DEFAULT_DAYS,
        help=f"days the certificates are valid (1-{MAX_DAYS}; never beyond the CA's end)",
    )
    return parser


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",")]


def _run(mode: str, args: argparse.Namespace) -> list[Path]:
    out = Path(args.out)
    if mode == "sites":
        return provision(out, _split(args.sites), _split(args.hosts), _split(args.site_hosts), args.days)
    if mode == "add_site":
        return add_site(out, args.add_site, _split(args.site_hosts), args.days)
    if mode == "add_admin":
        return add_admin(out, args.add_admin, args.days)
    if mode == "make_csr":
        return make_csr(out, args.make_csr, _split(args.site_hosts))
    return [sign_csr(out, Path(args.sign_csr), args.days)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line. Exit status: 0 done, 2 a usage error or refused input, 1 an I/O error."""
    parser = _parser()
    args = parser.parse_args(argv)
    mode = next(name for name in _MODE_OPTIONS if name in vars(args))
    for dest in ("hosts", "site_hosts", "days"):
        if dest not in _MODE_OPTIONS[mode] and getattr(args, dest) != parser.get_default(dest):
            parser.error(f"--{dest.replace('_', '-')} does not apply to --{mode.replace('_', '-')}")
    try:
        written = _run(mode, args)
    except PkiError as exc:
        print(f"phalanx.pki: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"phalanx.pki: error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
