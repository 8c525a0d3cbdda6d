"""Fuzzing the adapter codec: whatever arrives decodes exactly as declared or raises AdapterError.

Three generators: manifests and chunk lists built field by field (wild values and small
mutations of well-formed streams), serialised messages with random bytes and edits (parsed by
protobuf first, as gRPC would), and random adapters for round trips at every wire dtype. Each
test counts the inputs it tried; the last test checks every budget was spent and prints
`codec fuzz: N inputs ..., no crash or hang`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from phalanx.codec import (
    DEFAULT_MAX_ADAPTER_BYTES,
    MAX_RANK,
    WIRE_DTYPES,
    Adapter,
    AdapterAssembler,
    AdapterError,
    TensorLayout,
    decode,
    encode,
)
from phalanx.v1 import adapter_pb2 as pb

STREAMS = 1500
MESSAGES = 1000
ROUND_TRIPS = 200  # per wire dtype
BUDGET = {"streams": STREAMS, "messages": MESSAGES} | {f"round trip {w}": ROUND_TRIPS for w in WIRE_DTYPES}
TRIED: Counter[str] = Counter()
OUTCOMES: Counter[str] = Counter()

# Written out here rather than taken from the codec, so the tests check its tables too.
ITEMSIZE = {
    pb.DATA_TYPE_FLOAT32: 4,
    pb.DATA_TYPE_FLOAT16: 2,
    pb.DATA_TYPE_BFLOAT16: 2,
    pb.DATA_TYPE_FLOAT64: 8,
    pb.DATA_TYPE_UINT32: 4,  # masked words under secure aggregation
}
DECODED = {
    pb.DATA_TYPE_FLOAT32: np.float32,
    pb.DATA_TYPE_FLOAT16: np.float16,
    pb.DATA_TYPE_BFLOAT16: np.float32,
    pb.DATA_TYPE_FLOAT64: np.float64,
    pb.DATA_TYPE_UINT32: np.uint32,
}

F = TypeVar("F", bound=Callable[..., Any])


def fuzz(examples: int) -> Callable[[F], F]:
    """A fixed number of inputs, each of which must finish within the deadline (no hang).

    Slow generation on a busy machine is not a failure, so that health check is off.
    """
    return settings(
        max_examples=examples,
        deadline=timedelta(milliseconds=500),
        suppress_health_check=[HealthCheck.too_slow],
    )


TEXT = st.characters(exclude_categories=["Cs"])  # protobuf strings are UTF-8: no lone surrogates
NAMES = st.sampled_from(["w", "a.lora_A.weight", ""]) | st.text(TEXT, max_size=6)
KNOWN_DTYPES = st.sampled_from(sorted(ITEMSIZE))
DTYPES = KNOWN_DTYPES | st.sampled_from([0, 6, 99, -1]) | st.integers(-(2**31), 2**31 - 1)
HUGE_DIMS = st.sampled_from([2**31, 2**32, 2**63, 2**64 - 1])
DIMS = st.integers(0, 6) | HUGE_DIMS | st.integers(0, 2**64 - 1)
Spec = tuple[str, int, list[int]]


@dataclass
class Stream:
    manifest: pb.AdapterManifest
    chunks: list[pb.AdapterChunk]
    expected: list[TensorLayout] | None
    max_bytes: int
    must_decode: bool
    """Well formed by the rules the codec documents, judged here without its code."""


def well_formed(specs: list[Spec], total: int, max_bytes: int) -> bool:
    names = [name for name, _, _ in specs]
    if not all(names) or len(set(names)) != len(names):
        return False
    if any(dtype not in ITEMSIZE or len(shape) > MAX_RANK for _, dtype, shape in specs):
        return False
    need = sum(math.prod(s) * ITEMSIZE[d] for _, d, s in specs)
    # An empty tensor may not declare dimensions that would not fit had it elements.
    extents = (math.prod(x for x in s if x) * ITEMSIZE[d] for _, d, s in specs)
    return total == need <= max_bytes and all(e <= max_bytes for e in extents)


@st.composite
def specs_and_total(draw: st.DrawFn) -> tuple[list[Spec], int]:
    """Mostly tame tensors (unique names, known dtypes, small shapes), else anything protobuf holds."""
    if draw(st.integers(0, 3)):
        names = draw(st.lists(NAMES.filter(bool), unique=True, max_size=5))
        shapes = st.lists(st.integers(1, 8) | st.just(0) | HUGE_DIMS, max_size=4)
        specs = [(n, draw(KNOWN_DTYPES), draw(shapes)) for n in names]
    else:
        specs = draw(st.lists(st.tuples(NAMES, DTYPES, st.lists(DIMS, max_size=MAX_RANK + 2)), max_size=6))
    need = sum(math.prod(s) * ITEMSIZE.get(d, 1) for _, d, s in specs)
    near = [t for t in (need, need, need, need + 1, need - 1) if 0 <= t < 2**64]
    total = draw(st.sampled_from(near) if near and draw(st.integers(0, 3)) else st.integers(0, 2**64 - 1))
    return specs, total


BREAKS = ["keep"] * 3 + ["drop", "repeat", "swap", "renumber", "trim", "add", "empty", "random"]


@st.composite
def chunk_lists(draw: st.DrawFn, total: int) -> tuple[list[tuple[int, bytes]], bool]:
    """(index, data) pairs, and whether they are still the intact payload.

    They carry `total` random bytes (a little when `total` is large), then are often broken: a
    chunk dropped, repeated, swapped, renumbered, cut short, added or emptied, or all random.
    """
    length = total if total <= 1 << 16 else draw(st.integers(0, 1 << 10))
    payload = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(length)
    size = max(1, math.ceil(length / draw(st.integers(1, 64))))
    chunks = [(i, payload[s : s + size]) for i, s in enumerate(range(0, length, size))]
    how = draw(st.sampled_from(BREAKS))
    i, j = (draw(st.integers(0, max(len(chunks) - 1, 0))) for _ in range(2))
    if how == "random":
        indices = st.integers(0, 4) | st.integers(0, 2**32 - 1)
        chunks = draw(st.lists(st.tuples(indices, st.binary(max_size=64))))
    elif how == "add":
        chunks.append((len(chunks), draw(st.binary(min_size=1, max_size=16))))
    elif how == "empty":
        chunks.insert(i, (len(chunks), b""))
    elif chunks and how == "drop":
        del chunks[i]
    elif chunks and how == "repeat":
        chunks.insert(i, chunks[i])
    elif chunks and how == "swap":
        chunks[i], chunks[j] = chunks[j], chunks[i]
    elif chunks and how == "renumber":
        chunks[i] = (draw(st.integers(0, 2**32 - 1)), chunks[i][1])
    elif chunks and how == "trim":
        chunks[i] = (chunks[i][0], chunks[i][1][: draw(st.integers(0, len(chunks[i][1])))])
    return chunks, how == "keep" and length == total


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    specs, total = draw(specs_and_total())
    max_bytes = draw(st.sampled_from([DEFAULT_MAX_ADAPTER_BYTES] * 3 + [4096, 1]))
    chunks, intact = draw(chunk_lists(total))
    expected = draw(st.sampled_from(["none", "none", "same", "other"]))
    layout = specs
    if expected == "other":
        layout = draw(st.lists(st.tuples(NAMES, KNOWN_DTYPES, st.lists(DIMS, max_size=3)), max_size=3))
    tensors = [pb.TensorSpec(name=n, dtype=d, shape=s) for n, d, s in specs]
    return Stream(
        pb.AdapterManifest(tensors=tensors, total_bytes=total),
        [pb.AdapterChunk(index=i, data=data) for i, data in chunks],
        None if expected == "none" else [TensorLayout(n, d, tuple(s)) for n, d, s in layout],
        max_bytes,
        must_decode=intact and expected != "other" and well_formed(specs, total, max_bytes),
    )


def check_decoded(manifest: pb.AdapterManifest, chunks: list[pb.AdapterChunk], adapter: Adapter) -> None:
    """The adapter holds exactly the manifest's tensors, each made of its share of the chunks' bytes."""
    sent = b"".join(c.data for c in chunks)
    assert list(adapter) == [t.name for t in manifest.tensors]
    offset = 0
    for spec in manifest.tensors:
        array = adapter[spec.name]
        assert array.shape == tuple(spec.shape)
        assert array.dtype == DECODED[spec.dtype]
        assert not array.flags.writeable
        raw = sent[offset : offset + math.prod(spec.shape) * ITEMSIZE[spec.dtype]]
        if spec.dtype == pb.DATA_TYPE_BFLOAT16:
            bits = array.view(np.uint32)
            assert not (bits & 0xFFFF).any()
            assert (bits >> 16).astype("<u2").tobytes() == raw
        else:
            assert array.tobytes() == raw
        offset += len(raw)
    assert offset == len(sent) == manifest.total_bytes


def same_layout(a: Sequence[TensorLayout], b: Sequence[TensorLayout]) -> bool:
    return {t.name: t for t in a} == {t.name: t for t in b}


@fuzz(STREAMS)
@given(streams())
def test_any_stream_decodes_as_declared_or_raises_adapter_error(stream: Stream) -> None:
    TRIED["streams"] += 1
    try:
        assembler = AdapterAssembler(stream.manifest, expected=stream.expected, max_bytes=stream.max_bytes)
        for chunk in stream.chunks:
            assembler.add(chunk)
        adapter = assembler.finish()
    except AdapterError:
        OUTCOMES["AdapterError"] += 1
        assert not stream.must_decode, "a well-formed stream was refused"
        return
    OUTCOMES["decoded"] += 1
    check_decoded(stream.manifest, stream.chunks, adapter)
    if stream.expected is not None:
        assert same_layout(assembler.layout, stream.expected)


def valid_messages() -> tuple[bytes, list[bytes]]:
    rng = np.random.default_rng(0)
    adapter = {"a": rng.standard_normal((3, 4)), "b": np.zeros((0, 2)), "c": np.ones(5)}
    encoded = encode(adapter, WIRE_DTYPES["bfloat16"], chunk_bytes=7)
    return encoded.manifest.SerializeToString(), [c.SerializeToString() for c in encoded.chunks]


VALID_MANIFEST, VALID_CHUNKS = valid_messages()


@st.composite
def edited(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` unchanged, with bytes overwritten, cut short or spliced in, or replaced by random bytes."""
    how = draw(st.sampled_from(["keep", "keep", "overwrite", "truncate", "splice", "random"]))
    if how == "overwrite" and data:
        out = bytearray(data)
        edits = st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255))
        for position, value in draw(st.lists(edits, min_size=1, max_size=4)):
            out[position] = value
        return bytes(out)
    if how == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    if how == "splice":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(max_size=16)) + data[at:]
    if how == "random":
        return draw(st.binary(max_size=200))
    return data


@fuzz(MESSAGES)
@given(st.data())
def test_any_serialised_messages_decode_as_declared_or_raise(data: st.DataObject) -> None:
    raw_manifest = data.draw(edited(VALID_MANIFEST))
    kept = data.draw(st.integers(0, len(VALID_CHUNKS)))
    raw_chunks = [data.draw(edited(c)) for c in VALID_CHUNKS[:kept]]
    raw_chunks += data.draw(st.lists(st.binary(max_size=40), max_size=2))
    TRIED["messages"] += 1
    try:  # gRPC parses each message before the codec sees it; it fails the call on DecodeError
        manifest = pb.AdapterManifest.FromString(raw_manifest)
        chunks = [pb.AdapterChunk.FromString(c) for c in raw_chunks]
    except DecodeError:
        OUTCOMES["protobuf DecodeError"] += 1
        return
    try:
        adapter = decode(manifest, chunks)
    except AdapterError:
        OUTCOMES["AdapterError"] += 1
        return
    OUTCOMES["decoded"] += 1
    check_decoded(manifest, chunks, adapter)


def nearest_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 rounded to the nearest bfloat16, ties to even, by comparing both neighbours in float64."""
    low_bits = values.view(np.uint32) & 0xFFFF0000  # bits of the neighbour toward zero
    with np.errstate(all="ignore"):  # non-finite values are set aside at the end
        low = low_bits.view(np.float32).astype(np.float64)
        high = (low_bits + 0x10000).view(np.float32).astype(np.float64)  # the neighbour away from zero
        overflow = np.isinf(high)  # past the largest finite bfloat16: the next step would be 2**128
        high[overflow] = np.copysign(2.0**128, low[overflow])
        x = values.astype(np.float64)
        below, above = np.abs(x - low), np.abs(high - x)
        low_is_even = ((low_bits >> 16) & 1) == 0
        take_low = (below < above) | ((below == above) & low_is_even)
        rounded = np.where(take_low, low, high)
        rounded[np.abs(rounded) == 2.0**128] *= np.inf
        finite = np.isfinite(values)
        rounded[~finite] = values[~finite]
        return rounded.astype(np.float32)


SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0)
ARRAYS = hnp.arrays(np.float32, SHAPES, elements=st.floats(width=32)) | hnp.arrays(np.uint32, SHAPES).map(
    lambda bits: bits.view(np.float32)  # any bit pattern: NaNs with every payload, subnormals, Inf
)
ADAPTERS = st.dictionaries(st.text(TEXT, min_size=1, max_size=8), ARRAYS, max_size=5)


@pytest.mark.parametrize("wire", sorted(WIRE_DTYPES))
@fuzz(ROUND_TRIPS)
@given(adapter=ADAPTERS, transpose=st.booleans(), pieces=st.integers(1, 40))
def test_round_trip_at_every_wire_dtype(
    wire: str, adapter: dict[str, np.ndarray], transpose: bool, pieces: int
) -> None:
    TRIED[f"round trip {wire}"] += 1
    if transpose:  # non-contiguous input
        adapter = {name: array.T for name, array in adapter.items()}
    code = WIRE_DTYPES[wire]
    total = sum(a.size for a in adapter.values()) * ITEMSIZE[code]
    with np.errstate(over="ignore"):  # float16 overflows to Inf, as it should
        encoded = encode(adapter, code, chunk_bytes=max(1, math.ceil(total / pieces)))
        decoded = decode(encoded.manifest, encoded.chunks)
        expected = {
            "float32": lambda a: a,
            "float64": lambda a: a.astype(np.float64),
            "float16": lambda a: a.astype(np.float16),
            "bfloat16": nearest_bfloat16,
        }[wire]
        assert list(decoded) == list(adapter)
        for name, array in adapter.items():
            assert decoded[name].shape == array.shape
            want = expected(np.ascontiguousarray(array).reshape(-1))
            got = decoded[name].reshape(-1)
            assert got.dtype == want.dtype
            if wire != "bfloat16":
                assert got.tobytes() == want.tobytes()  # identical bits, NaN payloads included
            else:  # NaNs are sent as one quiet NaN; everything else bit for bit
                nan = np.isnan(want)
                assert (np.isnan(got) == nan).all() and got[~nan].tobytes() == want[~nan].tobytes()
    OUTCOMES["decoded"] += 1


def test_every_fuzz_budget_was_spent(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs after the tests above (pytest keeps file order): checks and prints their counts."""
    if not TRIED:
        pytest.skip("no fuzz test ran")
    for name, tried in TRIED.items():
        assert tried >= BUDGET[name], f"{name}: {tried} of {BUDGET[name]} inputs"
    outcomes = ", ".join(f"{n} {kind}" for kind, n in sorted(OUTCOMES.items()))
    with capsys.disabled():
        print(f"\ncodec fuzz: {TRIED.total()} inputs ({outcomes}), no crash or hang")
