"""Certificates for tests: one federation provisioned by `phalanx.pki`, plus the outsiders' kinds."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from phalanx.pki import (
    DEFAULT_SITE_HOSTS,
    ROLE_SITE,
    Authority,
    cert_pem,
    issue,
    key_pem,
    load_authority,
    new_authority,
    provision,
)
from phalanx.rpc import TlsCredentials

SITES = ("site-a", "site-b", "site-c", *(f"echo-{k}" for k in range(6)))


@dataclass(frozen=True)
class Pki:
    directory: Path
    authority: Authority

    @classmethod
    def provision(cls, directory: Path, sites: tuple[str, ...] = SITES) -> Pki:
        provision(directory, sites, ["localhost", "127.0.0.1"])
        return cls(directory, load_authority(directory))

    def creds(self, name: str) -> TlsCredentials:
        """The provisioned files of `name` (a site, "coordinator" or "admin")."""
        d = self.directory
        return TlsCredentials.load(d / "ca.pem", d / f"{name}.pem", d / f"{name}.key")

    def issued(
        self, name: str, role: str = ROLE_SITE, hosts=DEFAULT_SITE_HOSTS, *, authority: Authority | None = None, **validity
    ) -> TlsCredentials:
        """A new certificate for `name` from this CA (or `authority`), trusting this federation's CA."""
        cert, key = issue(authority or self.authority, name, role, hosts, **validity)
        return TlsCredentials(cert_pem(self.authority.cert), cert_pem(cert), key_pem(key))

    def from_another_ca(self, name: str) -> TlsCredentials:
        return self.issued(name, authority=new_authority())

    def expired(self, name: str) -> TlsCredentials:
        now = datetime.now(UTC)
        return self.issued(name, not_before=now - timedelta(days=10), not_after=now - timedelta(days=1))
