"""Calls from the coordinator to one trainer, over one channel kept for the trainer's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from phalanx.codec import DEFAULT_MAX_ADAPTER_BYTES, Adapter, EncodedAdapter, TensorLayout, check_finite
from phalanx.rpc import create_channel
from phalanx.streams import read_adapter
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


class TrainerClient:
    def __init__(self, address: str, telemetry: Telemetry) -> None:
        self.address = address
        self._channel = create_channel(address, telemetry)
        self._stub = trainer_pb2_grpc.TrainerServiceStub(self._channel)

    async def train(
        self,
        header: trainer_pb2.TrainHeader,
        adapter: EncodedAdapter,
        *,
        expected: Sequence[TensorLayout],
        timeout: float,
        max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
    ) -> TrainReply:
        """Send the global adapter, receive the trained one; raises AdapterError if it is malformed."""

        async def requests() -> AsyncIterator[trainer_pb2.TrainRequest]:
            yield trainer_pb2.TrainRequest(header=header)
            for chunk in adapter.chunks:
                yield trainer_pb2.TrainRequest(chunk=chunk)

        call = self._stub.Train(requests(), timeout=timeout)
        try:
            result, trained, received = await read_adapter(call, "result", expected=expected, max_bytes=max_bytes)
        finally:
            call.cancel()  # no-op after a clean end; stops the trainer's stream after a rejection
        check_finite(trained)
        sent = trainer_pb2.TrainRequest(header=header).ByteSize() + _chunk_bytes(adapter)
        return TrainReply(result, trained, sent, received)

    async def evaluate(
        self, header: trainer_pb2.EvaluateHeader, adapter: EncodedAdapter, *, timeout: float
    ) -> EvaluateReply:
        async def requests() -> AsyncIterator[trainer_pb2.EvaluateRequest]:
            yield trainer_pb2.EvaluateRequest(header=header)
            for chunk in adapter.chunks:
                yield trainer_pb2.EvaluateRequest(chunk=chunk)

        result = await self._stub.Evaluate(requests(), timeout=timeout)
        sent = trainer_pb2.EvaluateRequest(header=header).ByteSize() + _chunk_bytes(adapter)
        return EvaluateReply(result, sent, result.ByteSize())

    async def end_run(self, run_id: str, reason: str, timeout: float) -> None:
        await self._stub.EndRun(trainer_pb2.EndRunRequest(run_id=run_id, reason=reason), timeout=timeout)

    async def close(self) -> None:
        await self._channel.close()


def _chunk_bytes(adapter: EncodedAdapter) -> int:
    """Serialised size of the chunk messages, each wrapped in its request's oneof."""
    return sum(trainer_pb2.TrainRequest(chunk=c).ByteSize() for c in adapter.chunks)
