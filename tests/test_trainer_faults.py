"""Trainers that die, stall or lose the network mid-round: the round goes on without them.

Real coordinator and trainer code on loopback; a trainer that must be killed runs as its own
process (`python -m trainer.echo`), and faults on the wire come from tests/fault_proxy.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import grpc
import numpy as np
import pytest

from coordinator.run import RoundFailed
from phalanx.v1 import trainer_pb2, trainer_pb2_grpc
from tests.fault_proxy import FaultProxy
from tests.harness import kill, start_coordinator, start_echo_process, start_echo_site, stop_sites, wait_until
from trainer import service

PARAMS = 3_000_000  # 12 MB: more than the socket buffers and flow-control windows hold, so a kill cuts the stream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def proxied_echo_process(coordinator: str, partition: int, **flags):
    """An echo trainer process whose TrainerService the coordinator reaches only through a FaultProxy."""
    port = free_port()
    proxy = FaultProxy(f"127.0.0.1:{port}")
    await proxy.start()
    process = start_echo_process(
        coordinator, first_partition=partition, params=PARAMS, listen=f"127.0.0.1:{port}", advertise=proxy.address, **flags
    )
    return proxy, process


def failures(row: dict, phase: str = "train") -> dict[str, dict]:
    return {f["trainer"]: f for f in row["failures"] if f["phase"] == phase}


@pytest.mark.parametrize(("direction", "phase_name"), [("down", "uploading its adapter"), ("up", "receiving the global adapter")])
async def test_trainer_killed_mid_stream_is_dropped_and_round_completes(tmp_path: Path, direction: str, phase_name: str) -> None:
    coordinator = await start_coordinator(tmp_path, params=PARAMS, start_with=3, rounds=1, min_trainers=2)
    sites = [await start_echo_site(coordinator.address, k, params=PARAMS) for k in range(2)]
    proxy, process = await proxied_echo_process(coordinator.address, 2)
    proxy.throttle(direction, 2_000_000)  # bytes per second: the stream takes 6 s
    try:
        run = asyncio.create_task(coordinator.app.execute())
        await wait_until(lambda: len(coordinator.rows) == 1, timeout=60)  # round 0 (evaluation) is over
        before = proxy.forwarded[direction]
        await wait_until(lambda: proxy.forwarded[direction] > before + 2_000_000, timeout=60)
        kill(process)  # SIGKILL while round 1's adapter is on the wire
        rows = await asyncio.wait_for(run, timeout=60)
    finally:
        kill(process)
        await stop_sites(sites)
        await coordinator.close()
        await proxy.close()

    row = rows[-1]
    assert row["status"] == "ok" and row["trainers_accepted"] == 2 and row["trainers_sampled"] == 3, phase_name
    assert failures(row)["echo-2"]["status"] == "failed"
    assert failures(row)["echo-2"]["code"] in {"UNAVAILABLE", "CANCELLED", "INTERNAL"}
    np.testing.assert_allclose(coordinator.app.run.adapter["layer.0.weight"], coordinator.initial["layer.0.weight"], rtol=1e-6)
    assert coordinator.clients_counted()[("train", "failed", failures(row)["echo-2"]["code"])] == 1


async def test_too_few_replies_fail_the_round_with_a_message_naming_the_trainer(tmp_path: Path) -> None:
    coordinator = await start_coordinator(tmp_path, params=PARAMS, start_with=2, rounds=1, min_trainers=2)
    site = await start_echo_site(coordinator.address, 0, params=PARAMS)
    proxy, process = await proxied_echo_process(coordinator.address, 1)
    proxy.throttle("down", 2_000_000)
    try:
        run = asyncio.create_task(coordinator.app.execute())
        await wait_until(lambda: proxy.forwarded["down"] > 2_000_000, timeout=60)
        kill(process)
        with pytest.raises(RoundFailed, match=r"round 1: 1 accepted replies, need 2 \(echo-1: UNAVAILABLE"):
            await asyncio.wait_for(run, timeout=60)
    finally:
        kill(process)
        await stop_sites([site])
        await coordinator.close()
        await proxy.close()
    assert coordinator.rows[-1]["status"] == "failed"
    assert coordinator.app.run.completed_rounds == 0


async def test_killed_trainer_restarts_and_re_registers_without_a_duplicate(tmp_path: Path) -> None:
    coordinator = await start_coordinator(tmp_path, params=PARAMS, start_with=3, rounds=8, min_trainers=2)
    sites = [await start_echo_site(coordinator.address, k, params=PARAMS, delay=0.5) for k in range(2)]
    port = free_port()
    first = start_echo_process(coordinator.address, first_partition=2, params=PARAMS, listen=f"127.0.0.1:{port}")
    second = None
    try:
        run = asyncio.create_task(coordinator.app.execute())
        await wait_until(lambda: len(coordinator.rows) >= 1, timeout=60)  # round 0 is over; round 1 is training
        kill(first)
        second = start_echo_process(coordinator.address, first_partition=2, params=PARAMS, listen="127.0.0.1:0")
        rows = await asyncio.wait_for(run, timeout=120)
    finally:
        for process in (first, second):
            if process is not None:
                kill(process)
        await stop_sites(sites)
        await coordinator.close()

    entries = coordinator.app.registry.all()
    assert sorted(e.name for e in entries) == ["echo-0", "echo-1", "echo-2"]
    assert entries[2].address != f"127.0.0.1:{port}"  # the entry now points at the restarted process
    assert rows[-1]["trainers_accepted"] == 3, rows[-1]


async def test_slow_trainer_is_cut_off_by_the_deadline_and_its_job_stops(tmp_path: Path) -> None:
    coordinator = await start_coordinator(tmp_path, start_with=3, rounds=1, min_trainers=2, round_timeout=1.5)
    sites = [await start_echo_site(coordinator.address, k) for k in range(2)]
    slow = await start_echo_site(coordinator.address, 2, delay=60.0)
    try:
        rows = await asyncio.wait_for(coordinator.app.execute(), timeout=60)
        # Each call (evaluate in round 0, train and evaluate in round 1) ran out of time, and each job
        # saw its stop flag within a moment of its deadline.
        await wait_until(lambda: slow.learner.stopped_jobs == 3, timeout=2)
    finally:
        await stop_sites([*sites, slow])
        await coordinator.close()
    assert failures(rows[0], "evaluate")["echo-2"]["code"] == "DEADLINE_EXCEEDED"
    assert failures(rows[1])["echo-2"]["code"] == "DEADLINE_EXCEEDED"
    assert rows[1]["trainers_accepted"] == 2
    assert rows[1]["train_seconds"] < 10


async def test_network_partition_is_detected_by_keepalive_and_the_trainer_comes_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trainer.node")
    healed = asyncio.Event()

    def stop_once_back(row: dict) -> None:
        if healed.is_set() and row["trainers_accepted"] == 3:
            coordinator.app.run.stop_after_round()

    coordinator = await start_coordinator(
        tmp_path, params=PARAMS, start_with=3, rounds=100, min_trainers=2, round_timeout=120, liveness_timeout=3,
        on_round=stop_once_back,
    )  # fmt: skip
    sites = [await start_echo_site(coordinator.address, k, params=PARAMS, delay=0.2) for k in range(2)]
    to_trainer = FaultProxy("")
    to_coordinator = FaultProxy(coordinator.address)
    await to_coordinator.start()
    port = free_port()
    to_trainer.target = f"127.0.0.1:{port}"
    await to_trainer.start()
    site = await start_echo_site(
        to_coordinator.address, 2, params=PARAMS, listen=f"127.0.0.1:{port}", advertise=to_trainer.address
    )
    to_trainer.throttle("down", 2_000_000)
    try:
        run = asyncio.create_task(coordinator.app.execute())
        await wait_until(lambda: len(coordinator.rows) == 1, timeout=60)
        before = to_trainer.forwarded["down"]
        await wait_until(lambda: to_trainer.forwarded["down"] > before + 2_000_000, timeout=60)
        for proxy in (to_trainer, to_coordinator):
            proxy.partition()  # in the middle of round 1's upload
        await wait_until(lambda: any("echo-2" in failures(r) for r in coordinator.rows[1:]), timeout=30)
        await wait_until(lambda: backoffs(caplog), timeout=30)  # the trainer has noticed too
        to_trainer.reset()
        to_coordinator.heal()
        healed.set()
        rows = await asyncio.wait_for(run, timeout=90)
    finally:
        await stop_sites([*sites, site])
        await coordinator.close()
        for proxy in (to_trainer, to_coordinator):
            await proxy.close()

    cut = next(r for r in rows[1:] if "echo-2" in failures(r))
    assert failures(cut)["echo-2"]["code"] == "UNAVAILABLE"
    assert cut["train_seconds"] < 25, "keepalive (10 s + 5 s) should notice the partition long before the 120 s deadline"
    assert rows[-1]["trainers_accepted"] == 3 and rows[-1]["round"] > cut["round"]


def backoffs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "coordinator unreachable" in r.getMessage()]


async def test_a_call_that_overtakes_the_register_reply_waits_for_the_join(monkeypatch) -> None:
    """The coordinator may call a site it has just registered before the site has read the reply."""
    monkeypatch.setattr(service, "JOIN_GRACE_SECONDS", 0.5)
    site = await start_echo_site("127.0.0.1:1", 0, params=1_000, register=False)
    servicer = site.node.servicer
    servicer._run_id, servicer._joined = "", asyncio.Event()  # as before its Register reply arrived
    async with grpc.aio.insecure_channel(site.node.address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as never_joined:
            await stub.EndRun(trainer_pb2.EndRunRequest(run_id="run-1"))
        assert never_joined.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        call = asyncio.ensure_future(stub.EndRun(trainer_pb2.EndRunRequest(run_id="run-1", reason="done")))
        await asyncio.sleep(0.1)
        servicer.join("run-1", 10)  # the reply arrives while the call waits
        await call
    assert await site.task == "done"
    await site.node.close()
