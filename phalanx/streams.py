"""Reading an adapter out of a request or response stream, and the gRPC status for each failure."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from phalanx.codec import DEFAULT_MAX_ADAPTER_BYTES, Adapter, AdapterAssembler, AdapterError, AdapterTooLarge, TensorLayout
from phalanx.secagg.errors import KeyRejected, OutOfOrder, SecAggError
from phalanx.v1 import adapter_pb2

DISCARD_SECONDS = 1.0
UNSERVABLE_KEY = "phalanx-unservable-run"
"""Trailing metadata key of a site's FAILED_PRECONDITION that refuses a whole run (its model or
labels), not one call: the run leaves the site out of its later rounds."""


class WrongRound(AdapterError):
    """A message for another run or round than the one open: a closed, unknown or replayed round."""


class TransferStalled(AdapterError):
    """A peer did not deliver an adapter in the time its size allows once its transfer could start."""


def status_for(error: AdapterError) -> grpc.StatusCode:
    """The status that names a rejected message's fault.

    RESOURCE_EXHAUSTED for an oversized adapter, FAILED_PRECONDITION for a message from another
    round, DEADLINE_EXCEEDED for a stalled transfer, INVALID_ARGUMENT for any other malformed input.
    """
    if isinstance(error, AdapterTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, TransferStalled):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(error, WrongRound):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INVALID_ARGUMENT


def status_for_secagg(error: SecAggError) -> grpc.StatusCode:
    """FAILED_PRECONDITION for a secure-aggregation step out of turn or a replay, PERMISSION_DENIED
    for substituted keys, INVALID_ARGUMENT for anything else malformed."""
    if isinstance(error, OutOfOrder):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, KeyRejected):
        return grpc.StatusCode.PERMISSION_DENIED
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


def chunk_message_size(index: int, size: int) -> int:
    """Serialised bytes of a request or response message whose oneof holds an AdapterChunk.

    Equal to the message's `ByteSize()`, which serialises the message to count it (a copy of
    the chunk's bytes); every field number involved is below 16, so each tag is one byte.
    """
    inner = (1 + _varint_size(index) if index else 0) + (1 + _varint_size(size) + size if size else 0)
    return 1 + _varint_size(inner) + inner


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


async def read_header(stream: AsyncIterator[Any], header_field: str) -> tuple[Any, int]:
    """The first message of a oneof stream, which must be `header_field`, and its size in bytes."""
    first = await anext(stream, None)
    if first is None or first.WhichOneof("payload") != header_field:
        raise AdapterError(f"stream must start with a {header_field}")
    return getattr(first, header_field), first.ByteSize()


async def read_chunks(stream: AsyncIterator[Any], assembler: AdapterAssembler, *, until_complete: bool) -> int:
    """Feed the stream's chunk messages to `assembler`; return the bytes read.

    Reads to the end of the stream, or with `until_complete` only until the adapter's bytes are
    all in, leaving the stream open: the receiver can then act before the sender ends it.
    """
    nbytes = 0
    while not (until_complete and assembler.complete):
        message = await anext(stream, None)
        if message is None:
            break
        if message.WhichOneof("payload") != "chunk":
            raise AdapterError(f"expected an adapter chunk, got {message.WhichOneof('payload') or 'an empty message'}")
        chunk: adapter_pb2.AdapterChunk = message.chunk
        nbytes += chunk_message_size(chunk.index, assembler.add(chunk))
    return nbytes


async def read_adapter(
    stream: AsyncIterable[Any],
    header_field: str,
    *,
    expected: Sequence[TensorLayout] | Callable[[Any], Sequence[TensorLayout] | None] | None,
    match_dtype: bool = True,
    max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
    until_complete: bool = False,
) -> tuple[Any, Adapter, int]:
    """Read `header_field` then the chunks of the finite adapter it announces from a oneof stream.

    The header's `adapter` field is the manifest, checked against `expected` (or the layout that
    `expected(header)` gives). Returns the header, the adapter and the number of bytes read.
    Raises AdapterError when the stream is out of order or the adapter is malformed or not finite.
    """
    stream = aiter(stream)
    header, nbytes = await read_header(stream, header_field)
    if callable(expected):
        expected = expected(header)
    assembler = AdapterAssembler(header.adapter, expected=expected, match_dtype=match_dtype, max_bytes=max_bytes)
    nbytes += await read_chunks(stream, assembler, until_complete=until_complete)
    return header, assembler.finish(require_finite=True), nbytes


async def expect_end(stream: AsyncIterator[Any], what: str) -> None:
    """Raise AdapterError unless `stream` ends now: nothing may follow `what`."""
    if await anext(stream, None) is not None:
        raise AdapterError(f"the stream went on after {what}")
