"""Calls from the coordinator to one trainer, over one channel kept for the trainer's lifetime."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from phalanx.codec import (
    DEFAULT_MAX_ADAPTER_BYTES,
    Adapter,
    AdapterAssembler,
    AdapterError,
    EncodedAdapter,
    TensorLayout,
)
from phalanx.rpc import TlsCredentials, create_channel
from phalanx.streams import TransferStalled, check_round, read_chunks
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
    """The serialised chunk messages of one adapter for one request type, built once per phase.

    Every call of the phase sends these same bytes.
    """

    messages: tuple[bytes, ...]

    @classmethod
    def of(cls, request_type: type, adapter: EncodedAdapter) -> Broadcast:
        return cls(tuple(request_type(chunk=c).SerializeToString() for c in adapter.chunks))


class _Upload:
    """The request stream of one call: a header, then the shared chunk messages, then its end.

    The chunks are sent while holding one of `slots`, so only so many adapters are in flight at
    once; the stream ends once `end()` is called. Counts the bytes it sends.
    """

    def __init__(self, header: Any, broadcast: Broadcast, slots: asyncio.Semaphore) -> None:
        self._header = header.SerializeToString()
        self._broadcast = broadcast
        self._slots = slots
        self._end = asyncio.Event()
        self.bytes_sent = 0

    def end(self) -> None:
        self._end.set()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.bytes_sent += len(self._header)
        yield self._header
        async with self._slots:
            for message in self._broadcast.messages:
                self.bytes_sent += len(message)
                yield message
        await self._end.wait()


TRANSFER_BYTES_PER_SECOND = 1 << 20
"""The slowest rate at which a trainer may deliver its adapter once its transfer slot is free."""
TRANSFER_FLOOR_SECONDS = 30.0
"""What any reply may take once its slot is free, besides the time its size allows."""


def transfer_seconds(floor: float, nbytes: int) -> float:
    """How long a reply of `nbytes` may take once the coordinator has room for it."""
    return floor + nbytes / TRANSFER_BYTES_PER_SECOND


ProgressCallback = Callable[[int, float], None]
"""Told each of a trainer's progress reports: the steps it has done, and its mean loss so far."""


async def read_result(
    replies: AsyncIterator[trainer_pb2.TrainResponse], steps: int, on_progress: ProgressCallback | None
) -> tuple[trainer_pb2.TrainResult, int]:
    """The reply stream's progress reports (each handed to `on_progress`), then its result; the bytes read.

    A report must count more steps than the one before and no more than the `steps` asked for, so
    a trainer sends at most `steps` of them.
    """
    nbytes, last = 0, 0
    while True:
        message = await anext(replies, None)
        kind = message.WhichOneof("payload") if message is not None else None
        if kind == "result":
            return message.result, nbytes + message.ByteSize()
        if kind != "progress":
            raise AdapterError("the reply must start with progress reports or the result")
        nbytes += message.ByteSize()
        step = message.progress.step
        if not last < step <= steps:
            raise AdapterError(f"a progress report counts step {step} after step {last}, of {steps} steps asked for")
        last = step
        if on_progress is not None:
            on_progress(step, message.progress.loss)


def _method(name: str) -> str:
    return f"/{trainer_pb2.DESCRIPTOR.services_by_name['TrainerService'].full_name}/{name}"


class TrainerClient:
    """One trainer's channel and calls.

    With `tls`, the trainer must present the certificate whose identity SAN is `server_name`
    (its site's), whatever address it registered.
    """

    def __init__(self, address: str, telemetry: Telemetry, tls: TlsCredentials | None = None, server_name: str = "") -> None:
        self.address = address
        self._channel = create_channel(address, telemetry, tls, server_name=server_name)
        self._stub = trainer_pb2_grpc.TrainerServiceStub(self._channel)
        # Requests are written already serialised (bytes pass through a None serializer): the
        # adapter's chunk messages are serialised once per phase, not once per call.
        self._train = self._channel.stream_stream(
            _method("Train"), request_serializer=None, response_deserializer=trainer_pb2.TrainResponse.FromString
        )
        self._evaluate = self._channel.stream_unary(
            _method("Evaluate"), request_serializer=None, response_deserializer=trainer_pb2.EvaluateResponse.FromString
        )

    async def train(
        self,
        header: trainer_pb2.TrainHeader,
        adapter: Broadcast,
        *,
        expected: Sequence[TensorLayout],
        timeout: float,
        slots: asyncio.Semaphore,
        max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
        transfer_floor: float = TRANSFER_FLOOR_SECONDS,
        on_progress: ProgressCallback | None = None,
    ) -> TrainReply:
        """Send the global adapter, receive the trained one.

        One of `slots` is held while the global adapter is sent, and another while the reply is
        received: the request stream ends, which lets the trainer send its adapter, only once a
        slot is free. The reply must then arrive within `transfer_seconds(transfer_floor, size)`,
        so a trainer that goes silent cannot keep a slot from the others. The trainer's progress
        reports before its result go to `on_progress`. Raises AdapterError if the reply is
        malformed, WrongRound if it is for another round, TransferStalled if it is late.
        """
        upload = _Upload(trainer_pb2.TrainRequest(header=header), adapter, slots)
        call = self._train(aiter(upload), timeout=timeout)
        try:
            replies = aiter(call)
            result, received = await read_result(replies, header.local_steps, on_progress)
            check_round(result, header.run_id, header.round)
            assembler = AdapterAssembler(result.adapter, expected=expected, max_bytes=max_bytes)
            allowed = transfer_seconds(transfer_floor, result.adapter.total_bytes)
            async with slots:
                upload.end()
                try:
                    async with asyncio.timeout(allowed):
                        received += await read_chunks(replies, assembler, until_complete=False)
                except TimeoutError:
                    raise TransferStalled(f"the adapter did not arrive within {allowed:.1f} s of its turn") from None
        finally:
            upload.end()
            call.cancel()  # no-op after a clean end; stops the trainer's stream after a rejection
        return TrainReply(result, assembler.finish(require_finite=True), upload.bytes_sent, received)

    async def evaluate(
        self, header: trainer_pb2.EvaluateHeader, adapter: Broadcast, *, timeout: float, slots: asyncio.Semaphore
    ) -> EvaluateReply:
        upload = _Upload(trainer_pb2.EvaluateRequest(header=header), adapter, slots)
        upload.end()  # nothing to wait for: the reply is a few numbers
        result = await self._evaluate(aiter(upload), timeout=timeout)
        check_round(result, header.run_id, header.round)
        return EvaluateReply(result, upload.bytes_sent, result.ByteSize())

    async def connect(self, timeout: float) -> bool:
        """Set up the connection (and its TLS handshake) now, ahead of the first call; False if it fails in time."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            return False
        return True

    async def advertise_keys(
        self, request: trainer_pb2.AdvertiseKeysRequest, timeout: float
    ) -> trainer_pb2.AdvertiseKeysResponse:
        return await self._stub.AdvertiseKeys(request, timeout=timeout)

    async def share_keys(self, request: trainer_pb2.ShareKeysRequest, timeout: float) -> trainer_pb2.ShareKeysResponse:
        return await self._stub.ShareKeys(request, timeout=timeout)

    async def unmask(self, request: trainer_pb2.UnmaskRequest, timeout: float) -> trainer_pb2.UnmaskResponse:
        return await self._stub.Unmask(request, timeout=timeout)

    async def end_run(self, run_id: str, reason: str, timeout: float) -> None:
        await self._stub.EndRun(trainer_pb2.EndRunRequest(run_id=run_id, reason=reason), timeout=timeout)

    async def close(self) -> None:
        await self._channel.close()

