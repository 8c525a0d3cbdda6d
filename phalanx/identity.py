"""Who a peer is, and the bounds on the names and addresses that arrive over the network.

A peer's identity is read from its verified X.509 certificate, never from a message field: the
common name is the peer's name (a site name, or "coordinator") and the organisational unit its
role (`phalanx.pki` writes both). Names and addresses that a peer sends are checked here before
anything uses them, and `printable` makes any value from the network safe to log or to put in
an error message: escaped and cut short.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from phalanx.pki import SITE_SAN_SUFFIX, PkiError, check_host, check_site_name

__all__ = [
    "AddressError",
    "Identity",
    "check_address",
    "check_site_name",
    "escaped",
    "identity_of",
    "is_loopback",
    "printable",
]

MAX_ADDRESS_CHARS = 261  # a 253-character DNS name, a colon and a port, or a bracketed IPv6 address
PRINTABLE_LIMIT = 64


class AddressError(ValueError):
    """An address is not host:port with a DNS name or IP address and a port in 1-65535."""


@dataclass(frozen=True)
class Identity:
    """What a verified certificate says of its holder."""

    name: str
    role: str
    hosts: frozenset[str]
    """The DNS names and IP addresses the certificate is valid for (its identity SAN excluded)."""


@functools.lru_cache(maxsize=4096)
def identity_of(cert_pem: bytes) -> Identity:
    """The identity in a PEM certificate (one already verified by the TLS handshake)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    subject = cert.subject
    names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    roles = subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        hosts: frozenset[str] = frozenset()
    else:
        dns = [h for h in san.get_values_for_type(x509.DNSName) if not h.endswith(SITE_SAN_SUFFIX)]
        hosts = frozenset(dns + [str(ip) for ip in san.get_values_for_type(x509.IPAddress)])
    return Identity(
        name=str(names[0].value) if names else "",
        role=str(roles[0].value) if roles else "",
        hosts=hosts,
    )


def printable(value: object, limit: int = PRINTABLE_LIMIT) -> str:
    """`value` as a quoted, escaped string of bounded length: safe in logs and error messages."""
    text = str(value)
    shown = repr(text[:limit])
    return shown + (f"... ({len(text)} characters)" if len(text) > limit else "")


def escaped(value: object, limit: int = PRINTABLE_LIMIT) -> str:
    """Like `printable`, without the quotes: for free text such as a reason."""
    text = str(value)
    return repr(text[:limit])[1:-1] + ("..." if len(text) > limit else "")


def check_address(address: str, *, listening: bool = False) -> tuple[str, int]:
    """Split `host:port` into its host and port; raise AddressError with a bounded message if malformed.

    The host is a DNS name, an IPv4 address or a bracketed IPv6 address; schemes (`unix:`,
    `dns:///`) and anything else gRPC would resolve are refused. Port 0 (any free port) only
    when `listening`.
    """
    if not address or len(address) > MAX_ADDRESS_CHARS or ":" not in address:
        raise AddressError(f"address must be host:port, got {printable(address)}")
    host, _, port_text = address.rpartition(":")
    if not port_text.isdigit() or not (0 if listening else 1) <= int(port_text) <= 65535:
        raise AddressError(f"address {printable(address)} has no port in 1-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise AddressError(f"address {printable(address)} has a malformed IPv6 host") from None
        return host[1:-1], int(port_text)
    if ":" in host:
        raise AddressError(f"address {printable(address)} has an IPv6 host without brackets")
    try:
        check_host(host)
    except PkiError:
        raise AddressError(f"address {printable(address)} must have a DNS name or IP address as its host") from None
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an IP address, without brackets or port) is this machine's loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
