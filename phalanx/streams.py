"""Reading an adapter out of a request or response stream, and the gRPC status for each failure."""

from __future__ import annotations

from collections.abc import AsyncIterable, Sequence
from typing import Any

import grpc

from phalanx.codec import DEFAULT_MAX_ADAPTER_BYTES, Adapter, AdapterAssembler, AdapterError, AdapterTooLarge, TensorLayout
from phalanx.v1 import adapter_pb2


def status_for(error: AdapterError) -> grpc.StatusCode:
    """RESOURCE_EXHAUSTED for an oversized adapter, INVALID_ARGUMENT for any other malformed one."""
    return grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(error, AdapterTooLarge) else grpc.StatusCode.INVALID_ARGUMENT


async def read_adapter(
    stream: AsyncIterable[Any],
    header_field: str,
    *,
    expected: Sequence[TensorLayout] | None,
    max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
) -> tuple[Any, Adapter, int]:
    """Read `header_field` then the chunks of the adapter it announces from a oneof stream.

    The header's `adapter` field is the manifest. Returns the header, the adapter and the
    number of bytes read. Raises AdapterError when the stream is out of order or the adapter
    is malformed.
    """
    stream = aiter(stream)
    first = await anext(stream, None)
    if first is None or first.WhichOneof("payload") != header_field:
        raise AdapterError(f"stream must start with a {header_field}")
    header = getattr(first, header_field)
    assembler = AdapterAssembler(header.adapter, expected=expected, max_bytes=max_bytes)
    nbytes = first.ByteSize()
    async for message in stream:
        if message.WhichOneof("payload") != "chunk":
            raise AdapterError(f"expected an adapter chunk, got {message.WhichOneof('payload') or 'an empty message'}")
        nbytes += message.ByteSize()
        chunk: adapter_pb2.AdapterChunk = message.chunk
        assembler.add(chunk)
    return header, assembler.finish(), nbytes
