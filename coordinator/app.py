"""The one-shot coordinator: a federation with one run, started and stopped together.

With `series`, runs follow one another on the same sites (`--repetitions`): sites are admitted
for the run's labels and adapter layout as before, but serve every run of the series (each call
names it), and `next_run` starts the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from coordinator.config import CoordinatorConfig, RunConfig
from coordinator.federation import Admission, Federation
from coordinator.global_adapter import adapter_tensors
from coordinator.outputs import RunOutputs
from coordinator.run import Run, RunRecorder
from phalanx.codec import Adapter, layout_of
from phalanx.telemetry import Telemetry
from phalanx.v1 import coordinator_pb2


class CoordinatorApp:
    def __init__(
        self,
        config: CoordinatorConfig,
        telemetry: Telemetry,
        outputs: RunOutputs,
        initial: Adapter,
        *,
        run_id: str,
        start_round: int = 1,
        on_round: Callable[[dict[str, Any]], None] = lambda row: None,
        resumed: Mapping[str, str] | None = None,
        series: bool = False,
    ) -> None:
        self.config = config
        self._series = series
        self._closed = False
        admission = Admission(
            "" if series else run_id, 0 if series else config.rounds.rounds, config.label_names,
            layout_of(adapter_tensors(initial)), config.rounds.mixed_ranks,
        )  # fmt: skip
        self.federation = Federation(config.federation, telemetry, state=self._state, admission=admission)
        self.registry = self.federation.registry
        self.run = self.next_run(
            config.run, outputs, initial, run_id=run_id, start_round=start_round, on_round=on_round, resumed=resumed
        )

    def next_run(
        self,
        config: RunConfig,
        outputs: RunRecorder,
        initial: Adapter,
        *,
        run_id: str,
        start_round: int = 1,
        on_round: Callable[[dict[str, Any]], None] = lambda row: None,
        resumed: Mapping[str, str] | None = None,
    ) -> Run:
        """Host a run on this federation: the first, or the series' next once the last one ended."""
        self.run = Run(
            config, self.federation, outputs, initial, run_id=run_id, start_round=start_round, on_round=on_round, resumed=resumed
        )
        return self.run

    def _state(self) -> int:
        """What heartbeats report: the run's state, or, in a series, running until the last run is over."""
        if self._series and not self._closed:
            return coordinator_pb2.RUN_STATE_RUNNING
        return self.run.state

    @property
    def address(self) -> str:
        return self.federation.address

    async def start(self) -> str:
        """Serve on config.listen; return the address trainers should use."""
        return await self.federation.start()

    async def execute(self) -> list[dict[str, Any]]:
        return await self.run.execute()

    @property
    def waiting_for_trainers(self) -> bool:
        return self.run.state == coordinator_pb2.RUN_STATE_WAITING

    def stop_after_round(self) -> None:
        """Report NOT_SERVING at once, so orchestrators look elsewhere; end the run after the round in flight."""
        self.federation.drain()
        self.run.stop_after_round()

    async def close(self, reason: str) -> None:
        """Tell every trainer the run is over, then stop serving and close the channels."""
        self.run.state = coordinator_pb2.RUN_STATE_FINISHED  # heartbeats now say so too
        self._closed = True
        await self.federation.close(end_run=(self.run.run_id, reason))
