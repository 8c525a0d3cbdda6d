"""Reading an adapter out of a request or response stream, and the gRPC status for each failure."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, Callable, Sequence
from typing import Any

import grpc

from phalanx.codec import DEFAULT_MAX_ADAPTER_BYTES, Adapter, AdapterAssembler, AdapterError, AdapterTooLarge, TensorLayout
from phalanx.v1 import adapter_pb2

DISCARD_SECONDS = 1.0


class WrongRound(AdapterError):
    """A message for another run or round than the one open: a closed, unknown or replayed round."""


def status_for(error: AdapterError) -> grpc.StatusCode:
    """The status that names a rejected message's fault.

    RESOURCE_EXHAUSTED for an oversized adapter, FAILED_PRECONDITION for a message from another
    round, INVALID_ARGUMENT for any other malformed input.
    """
    if isinstance(error, AdapterTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, WrongRound):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INVALID_ARGUMENT


def check_round(message: Any, run_id: str, round_: int) -> None:
    """Raise WrongRound unless `message` (a reply with run_id and round fields) is for this round."""
    if message.run_id != run_id or message.round != round_:
        raise WrongRound(f"reply is for round {message.round} of run {message.run_id!r}; open is round {round_} of run {run_id!r}")


async def discard_rest(stream: AsyncIterable[Any], seconds: float = DISCARD_SECONDS) -> None:
    """Read and drop what a peer is still sending, for at most `seconds`.

    A server that rejects a request stream calls this before it aborts: a client whose write is
    in flight when the call ends would otherwise report "Internal error from Core" instead of
    the status that names the problem.
    """
    async def drop_all() -> None:
        async for _ in stream:
            pass

    with contextlib.suppress(TimeoutError, grpc.RpcError):
        await asyncio.wait_for(drop_all(), seconds)


async def read_adapter(
    stream: AsyncIterable[Any],
    header_field: str,
    *,
    expected: Sequence[TensorLayout] | None,
    match_dtype: bool = True,
    max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
    check_header: Callable[[Any], None] = lambda header: None,
    slots: asyncio.Semaphore | None = None,
) -> tuple[Any, Adapter, int]:
    """Read `header_field` then the chunks of the adapter it announces from a oneof stream.

    The header's `adapter` field is the manifest; `check_header` may refuse the header before
    any chunk is read, and the chunks are read holding one of `slots` (when given), which bounds
    how many adapters are being assembled at once. Returns the header, the adapter and the number of bytes read. Raises
    AdapterError when the stream is out of order or the adapter is malformed.
    """
    stream = aiter(stream)
    first = await anext(stream, None)
    if first is None or first.WhichOneof("payload") != header_field:
        raise AdapterError(f"stream must start with a {header_field}")
    header = getattr(first, header_field)
    check_header(header)
    assembler = AdapterAssembler(header.adapter, expected=expected, match_dtype=match_dtype, max_bytes=max_bytes)
    nbytes = first.ByteSize()
    async with slots or contextlib.nullcontext():
        async for message in stream:
            if message.WhichOneof("payload") != "chunk":
                raise AdapterError(f"expected an adapter chunk, got {message.WhichOneof('payload') or 'an empty message'}")
            nbytes += message.ByteSize()
            chunk: adapter_pb2.AdapterChunk = message.chunk
            assembler.add(chunk)
        return header, assembler.finish(), nbytes
