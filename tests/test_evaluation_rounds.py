"""--evaluate-every N: which rounds evaluate (0, N, 2N, ... and always the last), and --batch-order on the wire."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from coordinator.run_config import RunConfigError, parse_run_toml, round_config
from tests.harness import start_coordinator, start_echo_site, stop_sites
from trainer.echo import EchoLearner, synthetic_adapter
from trainer.jobs import EvalOutcome, TrainOutcome


class RecordingEcho(EchoLearner):
    """An echo learner that notes the rounds it evaluated in and the batch orders it was asked for."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(synthetic_adapter(1_000), delay=delay)
        self.evaluations = 0
        self.batch_orders: list[str] = []

    def train(self, adapter: Mapping[str, np.ndarray], **kwargs) -> TrainOutcome:
        self.batch_orders.append(kwargs["batch_order"])
        return super().train(adapter, **kwargs)

    def evaluate(self, adapter: Mapping[str, np.ndarray], **kwargs) -> EvalOutcome:
        self.evaluations += 1
        return super().evaluate(adapter, **kwargs)


def evaluated(rows: list[dict]) -> list[int]:
    return [r["round"] for r in rows if r["accuracy"] is not None]


@pytest.mark.parametrize(("rounds", "every", "expected"), [(5, 2, [0, 2, 4, 5]), (6, 3, [0, 3, 6]), (3, 1, [0, 1, 2, 3]), (2, 10, [0, 2])])
async def test_evaluate_every_evaluates_its_rounds_and_the_last(tmp_path: Path, rounds: int, every: int, expected: list[int]) -> None:
    coordinator = await start_coordinator(tmp_path, rounds=rounds, evaluate_every=every)
    learners = [RecordingEcho() for _ in range(2)]
    sites = [await start_echo_site(coordinator.address, k, learner=learner) for k, learner in enumerate(learners)]
    try:
        rows = await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        await coordinator.close()
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    assert evaluated(rows) == expected
    assert all(learner.evaluations == len(expected) for learner in learners)
    skipped = [r for r in rows if r["round"] not in expected]
    assert all(r["evaluators"] == 0 and r["loss"] is None and r["trainers_accepted"] == 2 for r in skipped)
    spans = {s.attributes["fl.round"]: s for s in coordinator.spans.get_finished_spans() if s.name == "fl.round"}
    assert sorted(r for r, s in spans.items() if "fl.accuracy" in s.attributes) == expected
    assert all(order == "grouped" for learner in learners for order in learner.batch_orders)


async def test_a_round_in_flight_when_the_run_is_stopped_evaluates_as_the_last(tmp_path: Path) -> None:
    coordinator = await start_coordinator(tmp_path, rounds=10, evaluate_every=5, batch_order="random")

    def stop_during_round_3(row: dict) -> None:
        if row["round"] == 2:  # round 3 starts now; its trainers take 0.3 s
            asyncio.get_running_loop().call_later(0.1, coordinator.app.stop_after_round)

    learners = [RecordingEcho(delay=0.3) for _ in range(2)]
    sites = [await start_echo_site(coordinator.address, k, learner=learner) for k, learner in enumerate(learners)]
    coordinator.app.run._on_round = stop_during_round_3
    try:
        rows = await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        await coordinator.close()
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert evaluated(rows) == [0, 3]
    assert learners[0].batch_orders == ["random"] * 3  # --batch-order travels in every Train call


def test_a_run_toml_takes_evaluate_every_and_batch_order_and_checks_them() -> None:
    args = parse_run_toml('rounds = 4\nevaluate-every = 2\nbatch-order = "random"\n', can_sign=False)
    assert round_config(args).evaluate_every == 2 and round_config(args).batch_order == "random"
    with pytest.raises(RunConfigError, match="--evaluate-every must be at least 1"):
        parse_run_toml("evaluate-every = 0\n", can_sign=False)
    with pytest.raises(RunConfigError, match="batch-order must be one of grouped, random"):
        parse_run_toml('batch-order = "sorted"\n', can_sign=False)

