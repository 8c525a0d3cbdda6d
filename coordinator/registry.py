"""Registered trainers: one entry per site name, with a channel kept for the life of the entry."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

from coordinator.trainer_client import TrainerClient
from phalanx.telemetry import Telemetry

log = logging.getLogger(__name__)


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


class Registry:
    def __init__(self, telemetry: Telemetry, liveness_timeout: float) -> None:
        self._telemetry = telemetry
        self._liveness_timeout = liveness_timeout
        self._entries: dict[str, TrainerEntry] = {}  # by site name
        self._by_id: dict[str, str] = {}  # trainer_id -> site name
        self._changed = asyncio.Condition()
        self._retired: list[TrainerClient] = []

    async def register(
        self, *, name: str, address: str, partition: int, num_train_examples: int, num_test_examples: int
    ) -> TrainerEntry:
        """Add a trainer, or replace the entry of one that registers again under the same name."""
        old = self._entries.get(name)
        if old is not None and old.address == address:
            old.last_seen = time.monotonic()
            old.num_train_examples, old.num_test_examples = num_train_examples, num_test_examples
            return old
        entry = TrainerEntry(
            trainer_id=uuid.uuid4().hex,
            name=name,
            address=address,
            partition=partition,
            num_train_examples=num_train_examples,
            num_test_examples=num_test_examples,
            client=TrainerClient(address, self._telemetry),
        )
        if old is not None:
            log.info("trainer %s re-registered at %s (was %s)", name, address, old.address)
            del self._by_id[old.trainer_id]
            # Calls of a round in flight may still hold the old client; close it at shutdown.
            self._retired.append(old.client)
        else:
            log.info("trainer %s registered at %s (%d examples)", name, address, num_train_examples)
        self._entries[name] = entry
        self._by_id[entry.trainer_id] = name
        async with self._changed:
            self._changed.notify_all()
        return entry

    def heartbeat(self, trainer_id: str) -> bool:
        """Record a heartbeat; False if the id is unknown (the trainer should register again)."""
        name = self._by_id.get(trainer_id)
        if name is None:
            return False
        self._entries[name].last_seen = time.monotonic()
        return True

    def heard_from(self, entry: TrainerEntry) -> None:
        """Record an answer from the trainer: it counts for liveness like a heartbeat."""
        entry.last_seen = time.monotonic()

    def live(self) -> list[TrainerEntry]:
        """Trainers heard from within the liveness timeout, ordered by site name."""
        cutoff = time.monotonic() - self._liveness_timeout
        return [e for _, e in sorted(self._entries.items()) if e.last_seen >= cutoff]

    def all(self) -> list[TrainerEntry]:
        return [e for _, e in sorted(self._entries.items())]

    async def wait_for(self, count: int, timeout: float) -> None:
        """Wait until at least `count` trainers are live; raise TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.live()) >= count)

    async def close(self) -> None:
        for client in [e.client for e in self._entries.values()] + self._retired:
            await client.close()
