"""Trust with real processes: provisioning by command, refusing plaintext off loopback, and a federation
of `python -m coordinator` and `python -m trainer` processes on separate network namespaces over mutual
TLS, with an impostor and an outsider among them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_coordinator_faults import ENV, ROOT, finish


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "coordinator", "--listen", "0.0.0.0:50051"],
        ["-m", "trainer", "--partition", "0", "--listen", "0.0.0.0:0"],
        ["-m", "trainer", "--partition", "0", "--coordinator", "coord.example:50051"],
    ],
    ids=["coordinator listens", "trainer listens", "trainer connects"],
)
def test_plaintext_off_loopback_refuses_to_start_and_says_how_to_provision(argv: list[str]) -> None:
    result = run(*argv)
    assert result.returncode == 2
    assert "without TLS" in result.stderr and "python -m phalanx.pki" in result.stderr and "--insecure" in result.stderr


# A federation across network namespaces -----------------------------------------------------------


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def namespaces(count: int) -> Iterator[tuple[list[str], list[str]]]:
    """`count` network namespaces on one bridge (the first one holds it), each with its own 10.x address.

    Yields the namespace names and their addresses; deletes them (and their links) afterwards.
    """
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = secrets.token_hex(3)
    names = [f"phx{tag}-{k}" for k in range(count)]
    subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
    addresses = [f"{subnet}.{k + 1}" for k in range(count)]
    hub = names[0]
    try:
        for name in names:
            sh("ip", "netns", "add", name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", hub, "addr", "add", f"{addresses[0]}/24", "dev", "br0")
        sh("ip", "-n", hub, "link", "set", "br0", "up")
        for k, name in enumerate(names[1:], start=1):
            sh("ip", "-n", hub, "link", "add", f"v{k}", "type", "veth", "peer", "name", "eth0", "netns", name)
            sh("ip", "-n", hub, "link", "set", f"v{k}", "master", "br0")
            sh("ip", "-n", hub, "link", "set", f"v{k}", "up")
            sh("ip", "-n", name, "addr", "add", f"{addresses[k]}/24", "dev", "eth0")
            sh("ip", "-n", name, "link", "set", "eth0", "up")
        yield names, addresses
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def start_in(namespace: str, module: str, *args: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as handle:
        return subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-m", module, *args],
            cwd=ROOT, env=ENV, stdout=handle, stderr=subprocess.STDOUT,
        )  # fmt: skip


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (log.exists() and text in log.read_text(errors="replace")):
        assert process.poll() is None, f"exited early: {log.read_text(errors='replace')}"
        assert time.monotonic() < deadline, f"no {text!r} in {log} within {timeout} s"
        time.sleep(0.1)


def test_a_federation_of_processes_on_separate_hosts_over_mutual_tls(tmp_path: Path, common_flags: list[str]) -> None:
    with namespaces(4) as (hosts, ips):
        coordinator_ip, site_ips, outsider_ip = ips[0], ips[1:3], ips[3]
        certs = tmp_path / "certs"
        # The operator provisions the coordinator and site-0; site-1 joins later with a CSR and its own key.
        provisioned = run("-m", "phalanx.pki", "--out", str(certs), "--sites", "site-0", "--hosts", coordinator_ip,
                          "--site-hosts", site_ips[0])  # fmt: skip
        assert provisioned.returncode == 0, provisioned.stderr
        site_dir = tmp_path / "site-1-private"
        assert run("-m", "phalanx.pki", "--out", str(site_dir), "--make-csr", "site-1", "--site-hosts", site_ips[1]).returncode == 0
        assert run("-m", "phalanx.pki", "--out", str(certs), "--sign-csr", str(site_dir / "site-1.csr")).returncode == 0
        assert not (certs / "site-1.key").exists()
        ca = ["--ca", str(certs / "ca.pem")]

        out = tmp_path / "run"
        coordinator = start_in(
            hosts[0], "coordinator", "--listen", f"{coordinator_ip}:50051", "--out", str(out), "--rounds", "2",
            "--local-steps", "2", "--batch-size", "8", "--min-trainers", "2", "--eval-max-examples", "20",
            "--round-timeout", "120", "--register-timeout", "120", *ca, "--cert", str(certs / "coordinator.pem"),
            "--key", str(certs / "coordinator.key"), *common_flags, log=tmp_path / "coordinator.log",
        )  # fmt: skip
        wait_for_line(tmp_path / "coordinator.log", "Coordinator listening on", coordinator)
        trainer_flags = ["--num-partitions", "2", "--coordinator", f"{coordinator_ip}:50051", "--threads", "1", *common_flags]
        # While it waits for its sites: site-0's stolen certificate and key used from another host, and a
        # trainer with no certificate at all.
        impostor = start_in(
            hosts[3], "trainer", "--partition", "1", "--listen", f"{outsider_ip}:0", "--give-up-after", "60", *trainer_flags,
            *ca, "--cert", str(certs / "site-0.pem"), "--key", str(certs / "site-0.key"), log=tmp_path / "impostor.log",
        )  # fmt: skip
        outsider = start_in(
            hosts[3], "trainer", "--partition", "1", "--listen", f"{outsider_ip}:0", "--insecure", "--give-up-after", "5",
            *trainer_flags, log=tmp_path / "outsider.log",
        )  # fmt: skip
        attackers = finish([impostor, outsider], timeout=120)
        site_keys = [certs / "site-0", site_dir / "site-1"]
        trainers = [
            start_in(
                hosts[1 + k], "trainer", "--partition", str(k), "--listen", f"{site_ips[k]}:0", *trainer_flags, *ca,
                "--cert", f"{certs / f'site-{k}'}.pem", "--key", f"{site_keys[k]}.key", "--give-up-after", "120",
                log=tmp_path / f"trainer-{k}.log",
            )  # fmt: skip
            for k in range(2)
        ]
        codes = finish([coordinator, *trainers], timeout=300) + attackers
        logs = {p.stem: p.read_text(errors="replace") for p in tmp_path.glob("*.log")}
    assert codes[:3] == [0, 0, 0], logs
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["status"]) for r in rows] == [(0, "ok"), (1, "ok"), (2, "ok")]
    assert all(r["trainers_accepted"] == 2 and not r["failures"] for r in rows[1:])
    # The coordinator refuses the stolen identity from a host its certificate does not name.
    assert codes[3] == 2 and "PERMISSION_DENIED" in logs["impostor"] and f"not valid for host '{outsider_ip}'" in logs["impostor"]
    # The outsider never gets through the TLS handshake, and gives up.
    assert codes[4] == 2 and "no answer from" in logs["outsider"]
