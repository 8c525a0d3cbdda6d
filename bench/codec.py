"""Codec throughput against memcpy: `python -m bench.codec [--quick]` from the repository root.

For each adapter size and wire dtype: `encode` (float32 arrays to chunk messages), protobuf's
`SerializeToString` and `FromString` of those chunks one at a time (what gRPC does to each
message of a stream), and `decode` of the parsed chunks. Every rate is payload bytes on the
wire per second; the number in brackets is that rate over memcpy's for the same byte count,
measured in the same run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bench.common import (
    DEFAULT_PARAMS,
    adapter_shapes,
    header,
    make_adapters,
    median_seconds,
    memcpy_gbps,
    quick_and_repeats,
)
from phalanx.codec import WIRE_DTYPES, decode, encode
from phalanx.v1 import adapter_pb2 as pb

PARAMS = (DEFAULT_PARAMS, 1_200_000, 12_000_000)
WIRES = ("float32", "bfloat16", "float16")
OPS = ("encode", "SerializeToString", "FromString", "decode")


def serialize_each(chunks: Sequence[pb.AdapterChunk]) -> None:
    for chunk in chunks:
        chunk.SerializeToString()


def parse_each(messages: Sequence[bytes]) -> None:
    for message in messages:
        pb.AdapterChunk.FromString(message)


def main(argv: list[str] | None = None) -> None:
    quick, repeats = quick_and_repeats(
        __doc__.splitlines()[0], "skip the 12M-parameter adapter, fewer repeats", argv
    )
    rng = np.random.default_rng(0)

    print(header("phalanx.codec: GB/s of wire payload (x memcpy of as many bytes)"))
    columns = f"{'P':>10} {'wire':>8} {'MB':>6} {'chunks':>6} {'memcpy':>7}"
    print(columns + "".join(f" {op:>18}" for op in OPS))
    for params in PARAMS[:2] if quick else PARAMS:
        [adapter], _ = make_adapters(adapter_shapes(params), 1, rng)
        count = sum(a.size for a in adapter.values())
        for wire in WIRES:
            code = WIRE_DTYPES[wire]
            encoded = encode(adapter, code)
            size = encoded.manifest.total_bytes
            serialized = [c.SerializeToString() for c in encoded.chunks]
            parsed = [pb.AdapterChunk.FromString(s) for s in serialized]
            seconds = (
                median_seconds(lambda: encode(adapter, code), repeats),
                median_seconds(lambda: serialize_each(encoded.chunks), repeats),
                median_seconds(lambda: parse_each(serialized), repeats),
                median_seconds(lambda: decode(encoded.manifest, parsed), repeats),
            )
            copy = memcpy_gbps(np.full(size, 1, dtype=np.uint8), repeats)
            cells = "".join(f" {size / s / 1e9:10.2f} ({size / s / 1e9 / copy:4.2f})" for s in seconds)
            row = f"{count:>10,} {wire:>8} {size / 1e6:6.2f} {len(encoded.chunks):>6} {copy:7.2f}{cells}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
