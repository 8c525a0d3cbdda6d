"""Where the dashboard reads runs from: the one-shot coordinator's run (`LocalRuns`) or a serving coordinator's (`ServedRuns`).

Both give the same JSON-ready shapes: a run's record (id, state, reason, rounds, completed_rounds,
...), its rows (the lines of its metrics.jsonl), its live `RunProgress` while it executes in this
process, and the registered sites.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from coordinator.outputs import RunOutputs
from coordinator.progress import RunProgress
from coordinator.registry import Registry
from coordinator.run import Run
from coordinator.serving import RunNotFound, ServingCoordinator
from coordinator.store import StoreError
from phalanx.v1 import coordinator_pb2


class RunSource(Protocol):
    async def runs(self) -> list[dict[str, Any]]:
        """Every run's record, oldest first."""

    async def run(self, run_id: str) -> dict[str, Any] | None:
        """One run's record, or None if there is no such run."""

    async def rows(self, run_id: str) -> list[dict[str, Any]]:
        """The run's rows in the order written; none for an unknown run."""

    def progress(self, run_id: str) -> RunProgress | None:
        """The run's live progress while this process executes it."""

    def sites(self) -> list[dict[str, Any]]:
        """The registered sites: name, address, partition, live, heard (Unix time of the last word from it)."""


def registry_sites(registry: Registry) -> list[dict[str, Any]]:
    """`RunSource.sites()` of a registry; `heard` stays the same between a site's heartbeats."""
    live = {e.name for e in registry.live()}
    wall, monotonic = time.time(), time.monotonic()
    return [
        {
            "name": e.name,
            "address": e.address,
            "partition": e.partition,
            "live": e.name in live,
            "heard": round(wall - (monotonic - e.last_seen), 1),
        }
        for e in registry.all()
    ]


class LocalRuns:
    """The runs this process executes itself (the one-shot coordinator's one run), in the order added.

    A run's state follows its `Run`: `waiting` for sites, `running`, then once it is finished
    `completed` if it ran to its end (the reason says why it ended early: a stopping rule or the
    privacy budget), `failed` if its last round failed, and `stopped` otherwise (a signal, or it
    ended before its sites came).
    """

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._runs: dict[str, tuple[Run, RunOutputs]] = {}
        self._failed_round: dict[str, int] = {}

    def add(self, run: Run, outputs: RunOutputs) -> None:
        self._runs[run.run_id] = (run, outputs)
        run.progress.subscribe(lambda event: self._note(run.run_id, event))

    async def runs(self) -> list[dict[str, Any]]:
        return [self._record(run) for run, _ in self._runs.values()]

    async def run(self, run_id: str) -> dict[str, Any] | None:
        known = self._runs.get(run_id)
        return self._record(known[0]) if known is not None else None

    async def rows(self, run_id: str) -> list[dict[str, Any]]:
        known = self._runs.get(run_id)
        return await asyncio.to_thread(known[1].read_metrics) if known is not None else []

    def progress(self, run_id: str) -> RunProgress | None:
        known = self._runs.get(run_id)
        return known[0].progress if known is not None else None

    def sites(self) -> list[dict[str, Any]]:
        return registry_sites(self._registry)

    def _note(self, run_id: str, event: dict[str, Any]) -> None:
        if event["kind"] == "round":
            row = event["row"]
            if row["status"] == "failed":
                self._failed_round[run_id] = row["round"]
            else:
                self._failed_round.pop(run_id, None)

    def _record(self, run: Run) -> dict[str, Any]:
        state, reason = self._state(run)
        return {
            "id": run.run_id,
            "state": state,
            "reason": reason,
            "rounds": run.config.rounds.rounds,
            "completed_rounds": run.completed_rounds,
        }

    def _state(self, run: Run) -> tuple[str, str]:
        if run.state == coordinator_pb2.RUN_STATE_WAITING:
            return "waiting", ""
        if run.state != coordinator_pb2.RUN_STATE_FINISHED:
            return "running", ""
        if run.progress.phase == "finished":
            return "completed", run.stop_reason
        if (failed := self._failed_round.get(run.run_id)) is not None:
            return "failed", f"round {failed} failed"
        return "stopped", f"ended after round {run.completed_rounds}"


class ServedRuns:
    """A serving coordinator's runs: every run in its store, with live progress for those it hosts now."""

    def __init__(self, coordinator: ServingCoordinator) -> None:
        self._coordinator = coordinator

    async def runs(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in await self._coordinator.list()]

    async def run(self, run_id: str) -> dict[str, Any] | None:
        try:
            return (await self._coordinator.get(run_id)).to_json()
        except RunNotFound:
            return None

    async def rows(self, run_id: str) -> list[dict[str, Any]]:
        try:
            return await asyncio.to_thread(self._coordinator.store.rows, run_id)
        except StoreError:
            return []

    def progress(self, run_id: str) -> RunProgress | None:
        hosted = self._coordinator.hosted.get(run_id)
        return hosted.progress if hosted is not None else None

    def sites(self) -> list[dict[str, Any]]:
        return registry_sites(self._coordinator.federation.registry)
