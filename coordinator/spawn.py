"""Local trainer processes for `--spawn-trainers N`: one command runs a whole federation.

Unless the run is --insecure, the federation is provisioned first with a throwaway CA under
`--out/pki` (valid for a day, made anew for every start): the coordinator and each spawned site
get their own certificate, so the demo runs over mutual TLS like a real federation.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from phalanx.identity import check_address
from phalanx.pki import COORDINATOR_NAME, DEFAULT_SITE_HOSTS, provision
from phalanx.rpc import TlsCredentials

THROWAWAY_DAYS = 1


@dataclass(frozen=True)
class SpawnedPki:
    directory: Path
    coordinator: TlsCredentials

    def site_flags(self, partition: int) -> list[str]:
        site = self.directory / spawned_site_name(partition)
        return ["--ca", str(self.directory / "ca.pem"), "--cert", f"{site}.pem", "--key", f"{site}.key"]


def spawned_site_name(partition: int) -> str:
    return f"partition-{partition}"


def provision_spawned(directory: Path, count: int, listen: str) -> SpawnedPki:
    """A fresh throwaway CA in `directory` with certificates for the coordinator and `count` local sites."""
    if directory.exists():
        shutil.rmtree(directory)
    host, _ = check_address(listen, listening=True)
    hosts = list(dict.fromkeys([host, *DEFAULT_SITE_HOSTS]))
    provision(directory, [spawned_site_name(k) for k in range(count)], hosts, days=THROWAWAY_DAYS)
    coordinator = TlsCredentials.load(
        directory / "ca.pem", directory / f"{COORDINATOR_NAME}.pem", directory / f"{COORDINATOR_NAME}.key"
    )
    return SpawnedPki(directory, coordinator)


class TrainerProcesses:
    """Starts `python -m trainer` for partitions 0..N-1 and stops them at the end."""

    def __init__(
        self, count: int, coordinator: str, flags: Sequence[str], log_dir: Path, threads: int, pki: SpawnedPki | None
    ) -> None:
        self.count = count
        self.pki = pki
        self.coordinator = coordinator
        self.flags = list(flags)
        self.log_dir = log_dir
        self.threads = threads
        self.processes: list[asyncio.subprocess.Process] = []

    def log_path(self, partition: int) -> Path:
        return self.log_dir / f"trainer-{partition}.log"

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.pop("OTEL_SERVICE_NAME", None)  # trainers report as phalanx-trainer
        # One torch thread pool per process, sized so that the trainers share the cores.
        env.update(OMP_NUM_THREADS=str(self.threads), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        for partition in range(self.count):
            command = [
                sys.executable, "-m", "trainer",
                "--partition", str(partition),
                "--num-partitions", str(self.count),
                "--coordinator", self.coordinator,
                "--threads", str(self.threads),
                "--give-up-after", "60",
                *self.flags,
                *(self.pki.site_flags(partition) if self.pki is not None else []),
            ]  # fmt: skip
            with open(self.log_path(partition), "wb") as log:
                self.processes.append(
                    await asyncio.create_subprocess_exec(*command, stdout=log, stderr=asyncio.subprocess.STDOUT, env=env)
                )

    async def first_exit(self) -> str:
        """Wait until any trainer process exits; return a message with the tail of its log."""
        waits = {asyncio.ensure_future(p.wait()): i for i, p in enumerate(self.processes)}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        task = done.pop()
        partition = waits[task]
        tail = self.log_path(partition).read_text(errors="replace").splitlines()[-5:]
        return f"trainer {partition} exited with code {task.result()}:\n    " + "\n    ".join(tail)

    async def stop(self, timeout: float = 15.0) -> None:
        """Wait for trainers to exit after the run ended; terminate, then kill, the ones that don't."""
        running = [p for p in self.processes if p.returncode is None]
        if running:
            _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in running], timeout=timeout)
            for p in running:
                if p.returncode is None:
                    p.terminate()
            if pending:
                _, pending = await asyncio.wait(pending, timeout=5.0)
            for p in running:
                if p.returncode is None:
                    p.kill()
                    await p.wait()
