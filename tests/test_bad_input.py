"""Bad input on the wire, in both directions: rejected with a status that names the problem, the run goes on.

Coordinator side: a rogue trainer (a real gRPC server speaking TrainerService) answers with a
crafted reply next to two honest echo trainers. The rogue must be rejected with the named
status, counted in `fl.round.clients`, marked on the round span, and left out of the average.

Trainer side: a raw client streams crafted requests at a real trainer server, which must answer
with the named status and stay healthy.
"""

from __future__ import annotations

import gzip
import math
import pickle
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from phalanx.codec import Adapter, encode
from phalanx.streams import read_adapter
from phalanx.v1 import adapter_pb2, trainer_pb2, trainer_pb2_grpc
from tests.harness import run_with_rogue, start_coordinator, start_echo_site, start_servicer_site, stop_sites

PARAMS = 1_000
MAX_BYTES = 64 * 1024

Craft = Callable[[trainer_pb2.TrainHeader, Adapter], list[trainer_pb2.TrainResponse]]


def reply(
    header: trainer_pb2.TrainHeader, adapter: Adapter, wire_dtype: int = adapter_pb2.DATA_TYPE_FLOAT32, **result_fields
) -> list[trainer_pb2.TrainResponse]:
    """An honest-looking reply carrying `adapter`; result_fields override the TrainResult."""
    encoded = encode(adapter, wire_dtype, chunk_bytes=1024)  # several chunks, to cut and shuffle
    fields = {"run_id": header.run_id, "round": header.round, "num_examples": 100, "adapter": encoded.manifest}
    fields.update(result_fields)
    return [trainer_pb2.TrainResponse(result=trainer_pb2.TrainResult(**fields))] + [
        trainer_pb2.TrainResponse(chunk=c) for c in encoded.chunks
    ]


def with_manifest(header, adapter, change: Callable[[adapter_pb2.AdapterManifest], None]) -> list:
    messages = reply(header, adapter)
    change(messages[0].result.adapter)
    return messages


def with_chunks(header, adapter, change: Callable[[list], list]) -> list:
    messages = reply(header, adapter)
    return messages[:1] + change(messages[1:])


def chunk(index: int, data: bytes) -> trainer_pb2.TrainResponse:
    return trainer_pb2.TrainResponse(chunk=adapter_pb2.AdapterChunk(index=index, data=data))


class Exploit:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled')",))


def first_key(a: Adapter) -> str:
    return next(iter(a))


def set_first(a: Adapter, value: float) -> Adapter:
    out = {k: v.copy() for k, v in a.items()}
    out[first_key(a)].flat[0] = value
    return out


def retype_first(m: adapter_pb2.AdapterManifest, dtype: int) -> None:
    m.tensors[0].dtype = dtype


def bump_total(m: adapter_pb2.AdapterManifest) -> None:
    m.total_bytes += 4


def oversize(m: adapter_pb2.AdapterManifest) -> None:
    m.tensors[0].shape[:] = [1, 10**9]
    m.total_bytes = sum(4 * math.prod(t.shape) for t in m.tensors)


CASES: dict[str, tuple[Craft, str, str]] = {
    # case 9: keys, shapes, dtypes, byte counts
    "missing key": (lambda h, a: reply(h, dict(list(a.items())[1:])), "INVALID_ARGUMENT", "missing keys 'layer.0.weight'"),
    "extra key": (lambda h, a: reply(h, {**a, "evil.weight": np.zeros(3, np.float32)}), "INVALID_ARGUMENT", "unexpected keys 'evil.weight'"),
    "wrong shape": (lambda h, a: reply(h, {k: v.reshape(-1, 1) for k, v in a.items()}), "INVALID_ARGUMENT", "has shape"),
    "wrong dtype": (
        lambda h, a: reply(h, a, adapter_pb2.DATA_TYPE_FLOAT64), "INVALID_ARGUMENT", "'layer.0.weight' has float64, expected float32"
    ),
    "unknown dtype": (lambda h, a: with_manifest(h, a, lambda m: retype_first(m, 99)), "INVALID_ARGUMENT", "unknown dtype 99"),
    "byte count": (lambda h, a: with_manifest(h, a, bump_total), "INVALID_ARGUMENT", "but its tensors need"),
    # case 10
    "nan": (lambda h, a: reply(h, set_first(a, math.nan)), "INVALID_ARGUMENT", "non-finite"),
    "inf": (lambda h, a: reply(h, set_first(a, -math.inf)), "INVALID_ARGUMENT", "non-finite"),
    # case 12
    "truncated": (lambda h, a: with_chunks(h, a, lambda c: c[:-1]), "INVALID_ARGUMENT", "stream ended after"),
    "gap": (lambda h, a: with_chunks(h, a, lambda c: [c[0], chunk(2, c[1].chunk.data)]), "INVALID_ARGUMENT", "chunk 1 is missing"),
    "duplicate index": (
        lambda h, a: with_chunks(h, a, lambda c: [c[0], chunk(0, bytes(len(c[0].chunk.data))), *c[1:]]),
        "INVALID_ARGUMENT", "chunk 0 arrived twice",
    ),  # fmt: skip
    "over the cap": (lambda h, a: with_manifest(h, a, oversize), "RESOURCE_EXHAUSTED", "declares more than"),
    # case 13
    "closed round": (lambda h, a: reply(h, a, round=h.round - 1), "FAILED_PRECONDITION", "reply is for round 0"),
    "unknown round": (lambda h, a: reply(h, a, round=h.round + 7), "FAILED_PRECONDITION", "reply is for round 8"),
    "other run": (lambda h, a: reply(h, a, run_id="run-0"), "FAILED_PRECONDITION", "of run 'run-0'"),
    # case 14: plain bytes where tensor bytes belong, stopped by the size checks
    "random bytes": (
        lambda h, a: with_chunks(h, a, lambda c: [chunk(0, np.random.default_rng(0).bytes(4 * PARAMS))]),
        "INVALID_ARGUMENT", "non-finite",
    ),  # fmt: skip
    "random bytes, short": (
        lambda h, a: with_chunks(h, a, lambda c: [chunk(0, np.random.default_rng(0).bytes(7))]),
        "INVALID_ARGUMENT", "stream ended after 7 of",
    ),  # fmt: skip
    "pickle": (lambda h, a: with_chunks(h, a, lambda c: [chunk(0, pickle.dumps(Exploit()))]), "INVALID_ARGUMENT", "stream ended after"),
    "gzip bomb": (
        lambda h, a: with_chunks(h, a, lambda c: [chunk(0, gzip.compress(bytes(100 << 20)))]),
        "INVALID_ARGUMENT", "runs past the 4000 bytes",
    ),  # fmt: skip
}


class RogueTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    """Answers Train with whatever `craft` builds from the received global adapter; evaluates honestly."""

    def __init__(self, craft: Craft) -> None:
        self.craft = craft

    async def Train(self, request_iterator, context) -> AsyncIterator[trainer_pb2.TrainResponse]:
        header, adapter, _ = await read_adapter(request_iterator, "header", expected=None, until_complete=True)
        for message in self.craft(header, adapter):
            yield message

    async def Evaluate(self, request_iterator, context) -> trainer_pb2.EvaluateResponse:
        header, _, _ = await read_adapter(request_iterator, "header", expected=None)
        return trainer_pb2.EvaluateResponse(run_id=header.run_id, round=header.round, num_examples=10, loss=1.0, accuracy=0.5)


@pytest.mark.parametrize("case", list(CASES))
async def test_coordinator_rejects_a_bad_reply_names_it_and_goes_on(tmp_path: Path, case: str) -> None:
    craft, code, message = CASES[case]
    coordinator = await start_coordinator(tmp_path, params=PARAMS, start_with=3, max_adapter_bytes=MAX_BYTES)
    rows = await run_with_rogue(coordinator, RogueTrainer(craft), params=PARAMS)

    row = rows[-1]
    [failure] = row["failures"]
    assert (failure["trainer"], failure["status"], failure["code"]) == ("rogue", "rejected", code)
    assert message in failure["reason"]
    assert row["status"] == "ok" and row["trainers_accepted"] == 2
    assert coordinator.clients_counted()[("train", "rejected", code)] == 1
    [event] = coordinator.round_events(1)
    assert event["name"] == "fl.client.rejected" and event["rpc.grpc.status_code"] == code and message in event["fl.reason"]
    adapter = coordinator.app.run.adapter
    assert all(np.isfinite(v).all() for v in adapter.values())
    for key, value in coordinator.initial.items():
        np.testing.assert_allclose(adapter[key], value, rtol=1e-6)  # the honest echoes' average


def nudged(scale: float) -> Craft:
    """A reply that moves every value of the global adapter by `scale` times a fixed random direction."""

    def craft(header, adapter):
        rng = np.random.default_rng(1)
        return reply(header, {k: v + scale * rng.standard_normal(v.shape, dtype=np.float32) for k, v in adapter.items()})

    return craft


def distance(a: Adapter, b: Adapter) -> float:
    return math.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a))


@pytest.mark.parametrize(
    ("settings", "bound"),
    [
        ({"aggregator": "fedavg"}, None),
        ({"aggregator": "fedavg", "clip_norm": 1.0}, 1.0),
        ({"aggregator": "median"}, 1.0),
        ({"aggregator": "trimmed-mean", "trim": 0.34}, 1.0),
    ],
)
async def test_update_a_million_times_larger_is_bounded_by_clipping_or_a_robust_aggregator(
    tmp_path: Path, settings: dict, bound: float | None
) -> None:
    # Honest updates have norm ~0.3 (0.01 per value over 1000 values); the poisoned one ~3e5.
    coordinator = await start_coordinator(tmp_path, params=PARAMS, start_with=3, **settings)
    rogues = [
        await start_servicer_site(coordinator.address, f"site-{k}", RogueTrainer(nudged(scale)), coordinator.initial)
        for k, scale in enumerate([0.01, 0.01, 0.01 * 1e6])
    ]
    try:
        rows = await coordinator.app.execute()
    finally:
        for rogue in rogues:
            await rogue.stop(0)
        await coordinator.close()
    assert rows[-1]["trainers_accepted"] == 3
    moved = distance(coordinator.app.run.adapter, coordinator.initial)
    if bound is None:
        assert moved > 1e4  # plain FedAvg lets one site drag the model anywhere
    else:
        assert moved <= bound


# Trainer side ------------------------------------------------------------------------------


def train_request_stream(messages: list) -> list[trainer_pb2.TrainRequest]:
    """The same crafts, as requests: the header takes the result's place."""
    out = []
    for m in messages:
        if m.WhichOneof("payload") == "result":
            r = m.result
            out.append(
                trainer_pb2.TrainRequest(
                    header=trainer_pb2.TrainHeader(run_id=r.run_id, round=r.round, local_steps=1, batch_size=1, learning_rate=1e-3, adapter=r.adapter)
                )
            )
        else:
            out.append(trainer_pb2.TrainRequest(chunk=m.chunk))
    return out


# A trainer takes the global adapter in any allowed wire dtype (the coordinator picks it), and the
# round checks on its side are the replay test below.
TRAINER_CASES = [c for c in CASES if c not in ("wrong dtype", "closed round", "unknown round", "other run")]


async def test_trainer_rejects_bad_requests_with_named_status_and_stays_healthy(tmp_path: Path) -> None:
    site = await start_echo_site("127.0.0.1:1", 0, params=PARAMS, register=False)
    try:
        async with grpc.aio.insecure_channel(site.node.address) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            adapter = site.learner.layout_adapter
            header = trainer_pb2.TrainHeader(run_id="run-1", round=3)

            async def call(requests: list) -> list:
                return [m async for m in stub.Train(iter(requests), timeout=10)]

            assert len(await call(train_request_stream(reply(header, adapter)))) >= 2  # a good request is served
            for case in TRAINER_CASES:
                craft, code, message = CASES[case]
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await call(train_request_stream(craft(header, adapter)))
                assert error.value.code().name == code, (case, error.value.details())
                assert message in error.value.details(), case
                status = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                assert status.status == health_pb2.HealthCheckResponse.SERVING

            # case 13: a replay of an earlier round of the same run
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call(train_request_stream(reply(trainer_pb2.TrainHeader(run_id="run-1", round=2), adapter)))
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "round 2 of run run-1 is closed" in error.value.details()
            assert len(await call(train_request_stream(reply(header, adapter)))) >= 2  # and it still serves
    finally:
        await stop_sites([site])
