"""Train replies flow only when the coordinator has room for them.

A trainer answers Train with its TrainResult when training ends, but sends the adapter's chunks
only once the coordinator has closed its request stream; the coordinator closes it only while
holding one of its `--max-transfers` slots. So however many trainers finish at once, at most
that many replies are in the coordinator's receive buffers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from phalanx.codec import decode, encode
from phalanx.streams import read_adapter
from phalanx.v1 import trainer_pb2, trainer_pb2_grpc
from tests.harness import start_coordinator, start_echo_site, start_servicer_site, stop_sites

PARAMS = 50_000
HEADER = trainer_pb2.TrainHeader(run_id="run-1", round=1, local_steps=1, batch_size=1, learning_rate=1e-3)


def request_stream(adapter: dict[str, np.ndarray]) -> list[trainer_pb2.TrainRequest]:
    encoded = encode(adapter, chunk_bytes=64 * 1024)  # several chunks
    header = trainer_pb2.TrainHeader()
    header.CopyFrom(HEADER)
    header.adapter.CopyFrom(encoded.manifest)
    return [trainer_pb2.TrainRequest(header=header)] + [trainer_pb2.TrainRequest(chunk=c) for c in encoded.chunks]


async def test_trainer_sends_its_adapter_only_after_the_request_stream_ends() -> None:
    site = await start_echo_site("127.0.0.1:1", 0, params=PARAMS, register=False)
    try:
        async with grpc.aio.insecure_channel(site.node.address) as channel:
            adapter = site.learner.layout_adapter
            call = trainer_pb2_grpc.TrainerServiceStub(channel).Train(timeout=30)
            for message in request_stream(adapter):
                await call.write(message)
            first = await call.read()
            assert first.WhichOneof("payload") == "result" and first.result.round == HEADER.round

            following = asyncio.ensure_future(call.read())  # not wait_for: cancelling a read cancels the call
            done, _ = await asyncio.wait({following}, timeout=0.5)
            assert not done, "the trainer sent adapter chunks before the request stream ended"

            await call.done_writing()
            chunks = [await following]
            while (message := await call.read()) is not grpc.aio.EOF:
                chunks.append(message)
            assert await call.code() == grpc.StatusCode.OK
            echoed = decode(first.result.adapter, [m.chunk for m in chunks])
            assert echoed.keys() == adapter.keys()
            assert all(np.array_equal(echoed[k], adapter[k]) for k in adapter)
    finally:
        await stop_sites([site])


async def test_trainer_refuses_a_request_stream_that_goes_on_after_the_adapter() -> None:
    site = await start_echo_site("127.0.0.1:1", 0, params=PARAMS, register=False)
    try:
        async with grpc.aio.insecure_channel(site.node.address) as channel:
            requests = request_stream(site.learner.layout_adapter)
            call = trainer_pb2_grpc.TrainerServiceStub(channel).Train(iter(requests + requests[-1:]), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                async for _ in call:
                    pass
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "the stream went on after the adapter" in error.value.details()
    finally:
        await stop_sites([site])


class CountingTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    """Echoes like a trainer and counts the replies whose chunks are being sent at once, across instances."""

    sending = 0
    most_sending = 0

    async def Train(self, request_iterator, context) -> AsyncIterator[trainer_pb2.TrainResponse]:
        header, adapter, _ = await read_adapter(request_iterator, "header", expected=None, until_complete=True)
        encoded = encode(adapter, chunk_bytes=64 * 1024)
        yield trainer_pb2.TrainResponse(
            result=trainer_pb2.TrainResult(
                run_id=header.run_id, round=header.round, num_examples=100, adapter=encoded.manifest
            )
        )
        async for _ in request_iterator:  # the coordinator ends the stream when it has room
            pass
        cls = type(self)
        cls.sending += 1
        cls.most_sending = max(cls.most_sending, cls.sending)
        await asyncio.sleep(0.05)  # long enough for every other trainer to start sending, were it let
        for c in encoded.chunks:
            yield trainer_pb2.TrainResponse(chunk=c)
        cls.sending -= 1

    async def Evaluate(self, request_iterator, context) -> trainer_pb2.EvaluateResponse:
        header, _, _ = await read_adapter(request_iterator, "header", expected=None)
        return trainer_pb2.EvaluateResponse(run_id=header.run_id, round=header.round, num_examples=10, loss=1.0, accuracy=0.5)


@pytest.mark.parametrize("max_transfers", [1, 2])
async def test_coordinator_takes_no_more_replies_at_once_than_max_transfers(tmp_path: Path, max_transfers: int) -> None:
    trainers = 6
    coordinator = await start_coordinator(
        tmp_path, params=PARAMS, start_with=trainers, min_trainers=trainers, rounds=2, max_transfers=max_transfers
    )
    CountingTrainer.sending = CountingTrainer.most_sending = 0
    servers = [
        await start_servicer_site(coordinator.address, f"site-{k}", CountingTrainer(), coordinator.initial, partition=k)
        for k in range(trainers)
    ]
    try:
        rows = await coordinator.app.execute()
    finally:
        for server in servers:
            await server.stop(0)
        await coordinator.close()
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert all(len(r["failures"]) == 0 for r in rows)
    assert CountingTrainer.most_sending <= max_transfers
    final = coordinator.app.run.adapter
    assert all(np.allclose(final[k], coordinator.initial[k], rtol=1e-6) for k in final)  # the average of six echoes



async def test_answered_calls_stand_in_for_heartbeats(tmp_path: Path) -> None:
    """While rounds keep a trainer busy it skips its heartbeats, and the coordinator still counts it live."""
    interval, liveness = 0.25, 1.0
    coordinator = await start_coordinator(
        tmp_path, start_with=2, rounds=25, heartbeat_interval=interval, liveness_timeout=liveness
    )
    sites = [await start_echo_site(coordinator.address, k, delay=0.1) for k in range(2)]
    try:
        started = asyncio.get_running_loop().time()
        rows = await coordinator.app.execute()
        seconds = asyncio.get_running_loop().time() - started
    finally:
        await stop_sites(sites)
        await coordinator.close()
    assert seconds > 3 * liveness  # long enough that a trainer heard from only by heartbeat would need them
    assert all(r["status"] == "ok" and r["trainers_accepted"] == 2 for r in rows[1:])
    beats = [s for s in coordinator.spans.get_finished_spans() if s.name.endswith("CoordinatorService/Heartbeat")]
    assert len(beats) < seconds / interval  # two trainers beating every interval would send twice that
