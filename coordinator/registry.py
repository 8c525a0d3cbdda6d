"""Registered trainers: one entry per site name, with a channel kept for the life of the entry.

The registry is bounded: at most `max_trainers` entries, each site may register only so often,
entries not heard from for `evict_after` seconds are removed, and with an allowlist a site that
is no longer listed is not sampled. A new entry's channel connects (and, with TLS, completes its
handshake) right away, so a round's first call does not pay for connection set-up.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from coordinator.allowlist import Allowlist
from coordinator.trainer_client import TrainerClient
from phalanx.pki import site_san
from phalanx.rpc import TlsCredentials
from phalanx.telemetry import Telemetry
from phalanx.v1 import coordinator_pb2

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 20.0
RATE_WINDOW_SECONDS = 60.0


class RegistrationRefused(Exception):
    """The registry will not take this registration now (full, or too many from one site)."""


@dataclass
class TrainerEntry:
    trainer_id: str
    name: str
    address: str
    partition: int
    num_train_examples: int
    num_test_examples: int
    client: TrainerClient
    last_seen: float = field(default_factory=time.monotonic)
    lora_rank: int = 0
    """The site's LoRA rank where it differs from the run's (a run with mixed ranks); 0: the run's."""
    capabilities: coordinator_pb2.SiteCapabilities = field(default_factory=coordinator_pb2.SiteCapabilities)


@dataclass(frozen=True)
class RegistryLimits:
    max_trainers: int = 1024
    """Entries at once; a registration beyond it is refused until stale entries are evicted."""
    registrations_per_minute: int = 30
    """Registrations one site name may make in any 60 s."""
    evict_after: float = 120.0
    """Seconds of silence after which an entry is removed (it may register again)."""
    close_retired_after: float = 600.0
    """Seconds a replaced or evicted entry's channel stays open for calls still in flight."""


class Registry:
    def __init__(
        self,
        telemetry: Telemetry,
        liveness_timeout: float,
        *,
        tls: TlsCredentials | None = None,
        limits: RegistryLimits = RegistryLimits(),
        allowlist: Allowlist | None = None,
    ) -> None:
        self._telemetry = telemetry
        self._liveness_timeout = liveness_timeout
        self._tls = tls
        self._limits = limits
        self.allowlist = allowlist
        self._entries: dict[str, TrainerEntry] = {}  # by site name
        self._by_id: dict[str, str] = {}  # trainer_id -> site name
        self._recent: dict[str, deque[float]] = {}  # site name -> its registrations in the rate window
        self._changed = asyncio.Condition()
        self._retired: set[TrainerClient] = set()
        self._tasks: set[asyncio.Task] = set()

    async def register(
        self,
        *,
        name: str,
        address: str,
        partition: int,
        num_train_examples: int,
        num_test_examples: int,
        lora_rank: int = 0,
        capabilities: coordinator_pb2.SiteCapabilities | None = None,
    ) -> TrainerEntry:
        """Add a trainer, or replace the entry of one that registers again under the same name.

        Raises RegistrationRefused when the site registers too often or the registry is full.
        """
        now = time.monotonic()
        self._limit_rate(name, now)
        self._evict_stale(now)
        old = self._entries.get(name)
        capabilities = capabilities or coordinator_pb2.SiteCapabilities()
        if old is not None and old.address == address:
            old.last_seen = now
            old.num_train_examples, old.num_test_examples = num_train_examples, num_test_examples
            old.lora_rank, old.capabilities = lora_rank, capabilities
            return old
        if old is None and len(self._entries) >= self._limits.max_trainers:
            raise RegistrationRefused(f"the registry is full ({self._limits.max_trainers} trainers, --max-trainers)")
        client = TrainerClient(address, self._telemetry, self._tls, server_name=site_san(name) if self._tls else "")
        entry = TrainerEntry(
            trainer_id=uuid.uuid4().hex,
            name=name,
            address=address,
            partition=partition,
            num_train_examples=num_train_examples,
            num_test_examples=num_test_examples,
            client=client,
            lora_rank=lora_rank,
            capabilities=capabilities,
        )
        if old is not None:
            log.info("trainer %s re-registered at %s (was %s)", name, address, old.address)
            self._remove(old)
        else:
            log.info("trainer %s registered at %s (%d examples)", name, address, num_train_examples)
        self._entries[name] = entry
        self._by_id[entry.trainer_id] = name
        self._spawn(self._connect(entry))
        async with self._changed:
            self._changed.notify_all()
        return entry

    def heartbeat(self, trainer_id: str, name: str | None = None) -> bool:
        """Record a heartbeat; False if the id is unknown, or not `name`'s (the trainer should register again)."""
        owner = self._by_id.get(trainer_id)
        if owner is None or (name is not None and owner != name):
            return False
        self._entries[owner].last_seen = time.monotonic()
        return True

    def heard_from(self, entry: TrainerEntry) -> None:
        """Record an answer from the trainer: it counts for liveness like a heartbeat."""
        entry.last_seen = time.monotonic()

    def live(self) -> list[TrainerEntry]:
        """Trainers heard from within the liveness timeout and still allowed, ordered by site name."""
        now = time.monotonic()
        self._evict_stale(now)
        cutoff = now - self._liveness_timeout
        live = [e for _, e in sorted(self._entries.items()) if e.last_seen >= cutoff]
        if self.allowlist is None:
            return live
        allowed = self.allowlist.sites()
        return [e for e in live if e.name in allowed]

    def all(self) -> list[TrainerEntry]:
        return [e for _, e in sorted(self._entries.items())]

    async def wait_for(self, count: int, timeout: float) -> None:
        """Wait until at least `count` trainers are live; raise TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.live()) >= count)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for client in [e.client for e in self._entries.values()] + list(self._retired):
            await client.close()

    def _limit_rate(self, name: str, now: float) -> None:
        window_start = now - RATE_WINDOW_SECONDS
        if len(self._recent) > 2 * self._limits.max_trainers:  # forget names quiet for a whole window
            self._recent = {n: times for n, times in self._recent.items() if times and times[-1] > window_start}
        times = self._recent.setdefault(name, deque())
        while times and times[0] <= window_start:
            times.popleft()
        if len(times) >= self._limits.registrations_per_minute:
            raise RegistrationRefused(
                f"site {name} registered {len(times)} times in the last {RATE_WINDOW_SECONDS:.0f} s; try again later"
            )
        times.append(now)

    def _evict_stale(self, now: float) -> None:
        for entry in [e for e in self._entries.values() if now - e.last_seen > self._limits.evict_after]:
            log.info("trainer %s evicted: not heard from for %.0f s", entry.name, now - entry.last_seen)
            del self._entries[entry.name]
            self._remove(entry)

    def _remove(self, entry: TrainerEntry) -> None:
        """Forget `entry`'s id; its channel stays open a while for calls of a round in flight."""
        self._by_id.pop(entry.trainer_id, None)
        self._retired.add(entry.client)
        self._spawn(self._close_later(entry.client))

    async def _close_later(self, client: TrainerClient) -> None:
        await asyncio.sleep(self._limits.close_retired_after)
        self._retired.discard(client)
        await client.close()

    async def _connect(self, entry: TrainerEntry) -> None:
        if not await entry.client.connect(CONNECT_TIMEOUT_SECONDS):
            log.warning("trainer %s: no connection to %s within %.0f s", entry.name, entry.address, CONNECT_TIMEOUT_SECONDS)

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
