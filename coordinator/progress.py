"""A run's progress as it happens: the round, its phase, each site's steps and its record so far.

The run updates it on the event loop; the terminal display (`coordinator.console`) and the web
dashboard (`coordinator.dashboard`) read it. Listeners get each event as a dict; readers that poll
wait for the version to change. No gRPC here.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

PHASES = ("waiting", "train", "aggregate", "evaluate", "finished")
Listener = Callable[[dict[str, Any]], None]


@dataclass
class SiteActivity:
    """One site in one run: what it is doing now, and its record over the run's rounds."""

    name: str
    state: str = "idle"
    """idle, training, evaluating, answered (this phase), failed or rejected (this phase)."""
    step: int = 0
    steps: int = 0
    loss: float | None = None
    """Mean training loss of the job in flight, as the site last reported it."""
    rounds_joined: int = 0
    """Training rounds whose reply was accepted."""
    failures: int = 0
    last_failure: str = ""
    bytes: int = 0
    """Bytes sent to and received from the site, every call of the run."""
    train_seconds: float = 0.0
    """The site's own account of its accepted training jobs."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        rounds = self.rounds_joined or math.nan
        data["bytes_per_round"] = round(self.bytes / rounds) if self.rounds_joined else None
        data["seconds_per_round"] = round(self.train_seconds / rounds, 3) if self.rounds_joined else None
        return data


class RunProgress:
    def __init__(self, run_id: str, total_rounds: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.run_id = run_id
        self.total_rounds = total_rounds
        self.round = -1
        """The round in flight, or the last one (-1 before round 0)."""
        self.phase = "waiting"
        self.sites: dict[str, SiteActivity] = {}
        self.asked: list[str] = []
        """The sites this phase asked."""
        self.round_seconds: list[float] = []
        """Wall seconds of the training rounds completed in this process."""
        self.version = 0
        self._clock = clock
        self._started = clock()
        self._round_started = self._started
        self._listeners: list[Listener] = []
        self._changed = asyncio.Event()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` with every event from now on; returns the function that stops it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    async def wait_change(self, since: int) -> int:
        """Wait until the version passes `since`; the version now."""
        while self.version <= since:
            await self._changed.wait()
        return self.version

    def begin_round(self, round_: int) -> None:
        self.round = round_
        self._round_started = self._clock()
        self._emit({"kind": "round_begun", "round": round_})

    def begin_phase(self, phase: str, sites: list[str] = (), steps: int = 0) -> None:
        """Enter `phase` (train, aggregate, evaluate), asking `sites`; a training phase runs `steps` each."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        self.phase = phase
        self.asked = list(sites)
        doing = {"train": "training", "evaluate": "evaluating"}.get(phase, "idle")
        for name in self.asked:
            site = self.site(name)
            site.state, site.step, site.steps, site.loss = doing, 0, steps if phase == "train" else 0, None
        self._emit({"kind": "phase", "round": self.round, "phase": phase, "sites": self.asked})

    def site_step(self, name: str, step: int, loss: float) -> None:
        site = self.site(name)
        site.step = step
        site.loss = loss if math.isfinite(loss) else None
        self._emit({"kind": "step", "round": self.round, "site": name, "step": step, "steps": site.steps, "loss": site.loss})

    def site_answered(
        self, name: str, phase: str, status: str, reason: str, nbytes: int, seconds: float, loss: float = math.nan
    ) -> None:
        """A call of `phase` to `name` ended: status accepted, failed or rejected; `loss`: a training job's, as it reported it."""
        site = self.site(name)
        site.bytes += nbytes
        if phase == "train" and math.isfinite(loss):
            site.loss = loss
        if status == "accepted":
            site.state = "answered"
            if phase == "train":
                site.rounds_joined += 1
                site.train_seconds += seconds
                site.step = site.steps
        else:
            site.state = status
            site.failures += 1
            site.last_failure = f"round {self.round} {phase}: {reason}" if reason else f"round {self.round} {phase}"
        self._emit({"kind": "answered", "round": self.round, "site": name, "phase": phase, "status": status, "reason": reason})

    def round_done(self, row: Mapping[str, Any]) -> None:
        if row["round"] > 0 and row["status"] == "ok":
            self.round_seconds.append(float(row["seconds"]))
        for name in self.asked:
            self.site(name).state = "idle"
        self.asked = []
        self._emit({"kind": "round", "row": dict(row)})

    def finish(self, reason: str = "") -> None:
        self.phase = "finished"
        self._emit({"kind": "finished", "reason": reason})

    def site(self, name: str) -> SiteActivity:
        if name not in self.sites:
            self.sites[name] = SiteActivity(name)
        return self.sites[name]

    def answered(self) -> int:
        return sum(self.sites[n].state in ("answered", "failed", "rejected") for n in self.asked)

    def elapsed(self) -> float:
        return self._clock() - self._started

    def round_elapsed(self) -> float:
        return self._clock() - self._round_started

    def eta_seconds(self) -> float | None:
        """Seconds the run still needs at the mean pace of its completed rounds; None before one completed."""
        if not self.round_seconds or self.phase == "finished":
            return None
        mean = sum(self.round_seconds) / len(self.round_seconds)
        left = max(0, self.total_rounds - max(self.round, 0))
        in_flight = max(0.0, mean - self.round_elapsed()) if self.round > 0 and self.phase != "waiting" else 0.0
        return in_flight + mean * left

    def snapshot(self) -> dict[str, Any]:
        """The whole state as JSON-ready data."""
        eta = self.eta_seconds()
        return {
            "run_id": self.run_id,
            "round": self.round,
            "total_rounds": self.total_rounds,
            "phase": self.phase,
            "asked": self.asked,
            "answered": self.answered(),
            "elapsed_seconds": round(self.elapsed(), 3),
            "round_elapsed_seconds": round(self.round_elapsed(), 3),
            "eta_seconds": None if eta is None else round(eta, 1),
            "sites": [s.to_json() for s in sorted(self.sites.values(), key=lambda s: s.name)],
        }

    def _emit(self, event: dict[str, Any]) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in list(self._listeners):
            listener(event)
