"""Calls from the coordinator to one trainer, over one channel kept for the trainer's lifetime."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from phalanx.codec import DEFAULT_MAX_ADAPTER_BYTES, Adapter, EncodedAdapter, TensorLayout, check_finite
from phalanx.rpc import create_channel
from phalanx.streams import check_round, read_adapter
from phalanx.telemetry import Telemetry
from phalanx.v1 import trainer_pb2, trainer_pb2_grpc


@dataclass(frozen=True)
class TrainReply:
    result: trainer_pb2.TrainResult
    adapter: Adapter
    bytes_sent: int
    bytes_received: int


@dataclass(frozen=True)
class EvaluateReply:
    result: trainer_pb2.EvaluateResponse
    bytes_sent: int
    bytes_received: int


@dataclass(frozen=True)
class Broadcast:
    """The chunk messages of one adapter for one request type, built and sized once per phase."""

    messages: tuple
    sizes: tuple[int, ...]

    @classmethod
    def of(cls, request_type: type, adapter: EncodedAdapter) -> Broadcast:
        messages = tuple(request_type(chunk=c) for c in adapter.chunks)
        return cls(messages, tuple(m.ByteSize() for m in messages))


class _Upload:
    """The request stream of one call: a header, then the shared chunk messages; counts bytes sent.

    The chunks are sent while holding one of `slots`, so only so many adapters are in flight at once.
    """

    def __init__(self, header: object, broadcast: Broadcast, slots: asyncio.Semaphore) -> None:
        self._header = header
        self._broadcast = broadcast
        self._slots = slots
        self.bytes_sent = 0

    async def __aiter__(self) -> AsyncIterator:
        self.bytes_sent += self._header.ByteSize()
        yield self._header
        async with self._slots:
            for message, size in zip(self._broadcast.messages, self._broadcast.sizes):
                self.bytes_sent += size
                yield message


class TrainerClient:
    def __init__(self, address: str, telemetry: Telemetry) -> None:
        self.address = address
        self._channel = create_channel(address, telemetry)
        self._stub = trainer_pb2_grpc.TrainerServiceStub(self._channel)

    async def train(
        self,
        header: trainer_pb2.TrainHeader,
        adapter: Broadcast,
        *,
        expected: Sequence[TensorLayout],
        timeout: float,
        slots: asyncio.Semaphore,
        max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
    ) -> TrainReply:
        """Send the global adapter, receive the trained one.

        Raises AdapterError if the reply is malformed or WrongRound if it is for another round.
        """
        upload = _Upload(trainer_pb2.TrainRequest(header=header), adapter, slots)
        call = self._stub.Train(aiter(upload), timeout=timeout)
        try:
            result, trained, received = await read_adapter(
                call,
                "result",
                expected=expected,
                max_bytes=max_bytes,
                check_header=lambda result: check_round(result, header.run_id, header.round),
                slots=slots,
            )
        finally:
            call.cancel()  # no-op after a clean end; stops the trainer's stream after a rejection
        check_finite(trained)
        return TrainReply(result, trained, upload.bytes_sent, received)

    async def evaluate(
        self, header: trainer_pb2.EvaluateHeader, adapter: Broadcast, *, timeout: float, slots: asyncio.Semaphore
    ) -> EvaluateReply:
        upload = _Upload(trainer_pb2.EvaluateRequest(header=header), adapter, slots)
        result = await self._stub.Evaluate(aiter(upload), timeout=timeout)
        check_round(result, header.run_id, header.round)
        return EvaluateReply(result, upload.bytes_sent, result.ByteSize())

    async def end_run(self, run_id: str, reason: str, timeout: float) -> None:
        await self._stub.EndRun(trainer_pb2.EndRunRequest(run_id=run_id, reason=reason), timeout=timeout)

    async def close(self) -> None:
        await self._channel.close()
