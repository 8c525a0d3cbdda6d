"""Names, addresses and identities from the network, and the allowlist file: plain functions, no sockets."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from coordinator.allowlist import Allowlist, AllowlistError, parse
from phalanx.identity import AddressError, check_address, escaped, identity_of, is_loopback, printable
from phalanx.pki import ROLE_SITE, cert_pem, issue, new_authority

GOOD_ADDRESSES = {
    "127.0.0.1:50051": ("127.0.0.1", 50051),
    "localhost:1": ("localhost", 1),
    "site-a.example.org:443": ("site-a.example.org", 443),
    "[::1]:7000": ("::1", 7000),
}
BAD_ADDRESSES = [
    "", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "unix:/tmp/x", "unix:///tmp/x:5", "dns:///h:5", "ipv4:1.2.3.4:5",
    "[::1:5", "[not-ip]:5", "a b:5", "host\n:5", "host:5\n", "-bad.example:5", "x" * 300 + ":5", "1.2.3:5", "h_:5",
]  # fmt: skip


@pytest.mark.parametrize("address", list(GOOD_ADDRESSES))
def test_addresses_are_split_into_host_and_port(address: str) -> None:
    assert check_address(address) == GOOD_ADDRESSES[address]


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_anything_but_host_and_port_is_refused_with_a_bounded_message(address: str) -> None:
    with pytest.raises(AddressError) as error:
        check_address(address)
    assert len(str(error.value)) < 200 and "\n" not in str(error.value)


def test_port_zero_only_for_listening() -> None:
    assert check_address("0.0.0.0:0", listening=True) == ("0.0.0.0", 0)


def test_loopback() -> None:
    assert [is_loopback(h) for h in ("127.0.0.1", "127.8.9.1", "::1", "localhost", "LOCALHOST")] == [True] * 5
    assert [is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "example.org", "::")] == [False] * 4


def test_values_from_the_network_are_escaped_and_cut_short() -> None:
    shown = printable("\x1b[31m" + "a\nb" * 1000)
    assert "\x1b" not in shown and "\n" not in shown and len(shown) < 120 and shown.endswith("(3005 characters)")
    assert escaped("done") == "done" and escaped("line\nforged") == "line\\nforged"


def test_identity_comes_from_the_certificate() -> None:
    cert, _ = issue(new_authority(), "site-a", ROLE_SITE, ["site-a.example", "10.1.2.3"])
    identity = identity_of(cert_pem(cert))
    assert (identity.name, identity.role) == ("site-a", "site")
    assert identity.hosts == {"site-a.example", "10.1.2.3"}  # the identity SAN is not a host


def test_allowlist_lines_and_weight_caps() -> None:
    entries = parse("# sites\nsite-a\nsite-b 5000   # capped\n\n")
    assert entries["site-a"].max_weight == math.inf and entries["site-b"].max_weight == 5000
    for bad in ("site-a 1 2", "a/b", "site-a -3", "site-a nan", "site-a zero"):
        with pytest.raises(AllowlistError, match="line 1"):
            parse(bad)


def test_allowlist_is_read_again_when_it_changes_and_keeps_the_last_good_list(tmp_path: Path) -> None:
    path = tmp_path / "allow.txt"
    path.write_text("site-a\nsite-b 10\n")
    allow = Allowlist(path)
    assert allow.allows("site-a") and allow.sites()["site-b"].max_weight == 10 and not allow.allows("site-c")
    path.write_text("site-c\n")
    assert allow.allows("site-c") and not allow.allows("site-a") and set(allow.sites()) == {"site-c"}
    path.write_text("site-c\nnot/valid\n")
    os.utime(path, ns=(1, 1))  # a change, whatever the clock's resolution
    assert allow.allows("site-c")  # a broken edit keeps the previous list
    path.unlink()
    assert allow.allows("site-c")
    with pytest.raises(AllowlistError):
        Allowlist(tmp_path / "missing.txt")
