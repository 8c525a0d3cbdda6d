"""Sites report their steps while they train, and the run keeps its progress: round, phase, sites, estimate."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from coordinator.progress import RunProgress
from coordinator.trainer_client import read_result
from phalanx.codec import AdapterError, encode
from phalanx.model import ModelConfig
from phalanx.v1 import trainer_pb2, trainer_pb2_grpc
from tests.harness import start_coordinator, start_echo_site, stop_sites
from tests.test_compute import _site
from trainer.progress import StepReporter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_follows_a_round_and_keeps_each_sites_record() -> None:
    clock = Clock()
    progress = RunProgress("run-1", total_rounds=4, clock=clock)
    events: list[dict[str, Any]] = []
    progress.subscribe(events.append)
    progress.begin_round(1)
    progress.begin_phase("train", ["a", "b"], steps=10)
    progress.site_step("a", 3, 0.9)
    assert progress.snapshot()["sites"][0] == {
        **progress.sites["a"].to_json(), "name": "a", "state": "training", "step": 3, "steps": 10, "loss": 0.9,
    }  # fmt: skip
    progress.site_answered("a", "train", "accepted", "", nbytes=1_000, seconds=2.0)
    progress.site_answered("b", "train", "failed", "UNAVAILABLE gone", nbytes=10, seconds=0.0)
    assert progress.answered() == 2
    assert progress.sites["a"].step == 10  # an accepted reply did all its steps
    progress.begin_phase("aggregate")
    assert progress.phase == "aggregate" and progress.asked == []
    assert progress.eta_seconds() is None  # no round completed yet: no pace to go by
    clock.now += 30
    progress.round_done({"round": 1, "status": "ok", "seconds": 30.0})
    assert progress.eta_seconds() == pytest.approx(3 * 30.0)
    progress.begin_round(2)
    progress.begin_phase("train", ["a"], steps=10)
    clock.now += 10
    assert progress.eta_seconds() == pytest.approx(20.0 + 2 * 30.0)  # the round in flight, then the rest
    a, b = progress.sites["a"].to_json(), progress.sites["b"].to_json()
    assert (a["rounds_joined"], a["bytes_per_round"], a["seconds_per_round"], a["failures"]) == (1, 1000, 2.0, 0)
    assert (b["rounds_joined"], b["failures"], b["last_failure"]) == (0, 1, "round 1 train: UNAVAILABLE gone")
    assert b["bytes_per_round"] is None
    assert [e["kind"] for e in events] == [
        "round_begun", "phase", "step", "answered", "answered", "phase", "round", "round_begun", "phase",
    ]  # fmt: skip
    assert progress.version == len(events)


async def test_a_reader_waits_for_the_next_change() -> None:
    progress = RunProgress("run-1", total_rounds=1)
    waiter = asyncio.create_task(progress.wait_change(progress.version))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    progress.begin_round(0)
    assert await asyncio.wait_for(waiter, 1) == 1


async def replies(*messages: trainer_pb2.TrainResponse) -> AsyncIterator[trainer_pb2.TrainResponse]:
    for message in messages:
        yield message


def report(step: int, loss: float = 1.0) -> trainer_pb2.TrainResponse:
    return trainer_pb2.TrainResponse(progress=trainer_pb2.TrainProgress(step=step, loss=loss))


RESULT = trainer_pb2.TrainResponse(result=trainer_pb2.TrainResult(run_id="r", round=1, steps=10))


async def test_the_coordinator_reads_reports_then_the_result() -> None:
    seen: list[tuple[int, float]] = []
    result, nbytes = await read_result(replies(report(2, 0.5), report(9, 0.25), RESULT), 10, lambda s, l: seen.append((s, l)))
    assert seen == [(2, 0.5), (9, 0.25)] and result.steps == 10
    assert nbytes == report(2, 0.5).ByteSize() + report(9, 0.25).ByteSize() + RESULT.ByteSize()


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([report(5), report(5), RESULT], "step 5 after step 5"),
        ([report(11), RESULT], "step 11 after step 0, of 10 steps"),
        ([report(0), RESULT], "step 0 after step 0"),
        ([trainer_pb2.TrainResponse(chunk={"index": 0}), RESULT], "must start with progress reports or the result"),
        ([report(3)], "must start with progress reports or the result"),
    ],
)
async def test_reports_are_bounded_by_the_steps_asked_for(messages: list[trainer_pb2.TrainResponse], message: str) -> None:
    with pytest.raises(AdapterError, match=message):
        await read_result(replies(*messages), 10, None)


async def test_the_reporter_passes_on_the_latest_report_at_most_every_interval() -> None:
    clock = Clock()
    reporter = StepReporter(asyncio.get_running_loop(), interval=0.25, clock=clock)
    job: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    received: list[int] = []

    async def read() -> None:
        async for r in reporter.reports_until(job):
            received.append(r.step)

    reading = asyncio.create_task(read())
    reporter(1, 9.0)  # too soon after the job started
    clock.now += 0.3
    reporter(2, 8.0)
    await asyncio.sleep(0.01)
    clock.now += 0.1
    reporter(3, 7.0)  # too soon after the last
    clock.now += 0.2
    reporter(4, 6.0)
    clock.now += 0.3
    reporter(5, 5.0)  # 4 is still unread: 5 replaces it
    await asyncio.sleep(0.01)
    job.set_result(None)
    await asyncio.wait_for(reading, 1)
    assert received == [2, 5]


async def test_sites_steps_reach_the_runs_progress_while_they_train(tmp_path: Path) -> None:
    coordinator = await start_coordinator(tmp_path, rounds=1, local_steps=8)
    events: list[dict[str, Any]] = []
    coordinator.app.run.progress.subscribe(events.append)
    sites = [await start_echo_site(coordinator.address, k, delay=1.6) for k in range(2)]
    try:
        await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        await coordinator.close()
    for name in ("echo-0", "echo-1"):
        mine = [e for e in events if e.get("site") == name and e["round"] == 1]
        steps = [e["step"] for e in mine if e["kind"] == "step"]
        answered = [i for i, e in enumerate(mine) if e["kind"] == "answered" and e["phase"] == "train"]
        assert len(steps) >= 2 and all(0 < s <= 8 for s in steps) and steps[0] < 8 and steps == sorted(set(steps))
        assert answered and all(e["kind"] == "step" for e in mine[: answered[0]])  # the steps came before the reply
    phases = [(e["round"], e["phase"]) for e in events if e["kind"] == "phase"]
    assert phases == [(0, "evaluate"), (1, "train"), (1, "aggregate"), (1, "evaluate")]
    record = coordinator.app.run.progress.sites["echo-0"].to_json()
    assert record["rounds_joined"] == 1 and record["failures"] == 0 and record["bytes_per_round"] > 0
    assert events[-1] == {"kind": "finished", "reason": ""}


def test_a_learner_tells_every_step_and_its_mean_loss(tiny_model_dir: Path) -> None:
    from trainer.learner import Learner

    learner = Learner(ModelConfig(model=str(tiny_model_dir), max_length=16), _site(60))
    seen: list[tuple[int, float]] = []
    outcome = learner.train(
        learner.layout_adapter, steps=5, batch_size=8, learning_rate=1e-2, seed=1, stop=threading.Event(),
        on_step=lambda step, loss: seen.append((step, float(loss))),
    )  # fmt: skip
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5]
    assert seen[-1][1] == pytest.approx(outcome.loss, rel=1e-6)


async def test_a_trainer_streams_reports_before_its_result() -> None:
    site = await start_echo_site("127.0.0.1:1", 0, params=100, register=False, delay=1.2)
    header = trainer_pb2.TrainHeader(run_id="run-1", round=1, local_steps=6, batch_size=1, learning_rate=1e-3)
    encoded = encode(site.learner.layout_adapter)
    header.adapter.CopyFrom(encoded.manifest)
    requests = [trainer_pb2.TrainRequest(header=header)] + [trainer_pb2.TrainRequest(chunk=c) for c in encoded.chunks]
    try:
        async with grpc.aio.insecure_channel(site.node.address) as channel:
            call = trainer_pb2_grpc.TrainerServiceStub(channel).Train()
            for r in requests:
                await call.write(r)
            await call.done_writing()
            kinds = [m.WhichOneof("payload") async for m in call]
    finally:
        await stop_sites([site])
    first_result = kinds.index("result")
    assert first_result >= 2 and set(kinds[:first_result]) == {"progress"}
    assert set(kinds[first_result + 1 :]) == {"chunk"}
    np.testing.assert_equal(kinds.count("result"), 1)
