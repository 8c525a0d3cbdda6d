"""Adapters (dicts of numpy arrays) to and from the wire's manifest-and-chunks form.

An adapter travels as an `AdapterManifest` (names, dtypes and shapes in stream order, and the
total byte count) followed by `AdapterChunk`s that carry the concatenated raw little-endian
bytes. Decoding never trusts a byte it has not checked: the manifest's sizes must add up and
stay under a cap before any buffer is allocated, chunks must arrive numbered 0, 1, 2, ... and
fill the payload exactly, and arrays are only then viewed with `np.frombuffer`. Nothing is
ever unpickled.

Copies: encoding writes each chunk's bytes once, straight from the arrays (after a cast when the
wire dtype differs), and protobuf copies them into the message. Decoding reads each chunk's
bytes out of its message once (protobuf copies them); when one chunk holds the whole payload
the arrays are views of those bytes, otherwise the chunks are copied once into one buffer.
bfloat16 is widened into new float32 arrays. Decoded arrays are read-only: copy one to write.

Errors: `AdapterError` (malformed input; its message names the tensor or chunk at fault) and
its subclass `AdapterTooLarge` (the declared size exceeds the receiver's cap).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from phalanx.v1 import adapter_pb2 as pb

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_MAX_ADAPTER_BYTES",
    "WIRE_DTYPES",
    "Adapter",
    "AdapterAssembler",
    "AdapterError",
    "AdapterTooLarge",
    "EncodedAdapter",
    "TensorLayout",
    "check_finite",
    "check_layout",
    "decode",
    "dtype_name",
    "encode",
    "layout_of",
    "manifest_of",
    "parse_manifest",
]

Adapter = dict[str, np.ndarray]

CHUNK_BYTES = 1 << 20
"""Largest chunk payload a sender produces and a receiver accepts (1 MiB)."""

DEFAULT_MAX_ADAPTER_BYTES = 256 << 20
"""Receivers refuse manifests that declare more than this many payload bytes."""

CACHED_MANIFEST_BYTES = 1 << 16
MAX_TENSORS = 100_000
MAX_RANK = 8

# Wire dtype -> numpy dtype of the bytes on the wire. bfloat16 has no numpy type: its bytes are
# read as uint16 and widened to float32 on decode.
_STORAGE: dict[int, np.dtype] = {
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    pb.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    pb.DATA_TYPE_BFLOAT16: np.dtype("<u2"),
    pb.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    pb.DATA_TYPE_UINT32: np.dtype("<u4"),  # masked words under secure aggregation
}
WIRE_DTYPES: dict[str, int] = {
    "float32": pb.DATA_TYPE_FLOAT32,
    "float16": pb.DATA_TYPE_FLOAT16,
    "bfloat16": pb.DATA_TYPE_BFLOAT16,
    "float64": pb.DATA_TYPE_FLOAT64,
}
_NAMES = {code: name for name, code in WIRE_DTYPES.items()} | {pb.DATA_TYPE_UINT32: "uint32"}


class AdapterError(ValueError):
    """A malformed adapter: wrong keys, shapes, dtypes, sizes, chunk order or values."""


class AdapterTooLarge(AdapterError):
    """An adapter that declares more bytes than the receiver accepts."""


def dtype_name(code: int) -> str:
    return _NAMES.get(code, f"unknown dtype {code}")


@dataclass(frozen=True)
class TensorLayout:
    name: str
    dtype: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _STORAGE[self.dtype].itemsize


def layout_of(adapter: Mapping[str, np.ndarray], wire_dtype: int = pb.DATA_TYPE_FLOAT32) -> tuple[TensorLayout, ...]:
    """The layout an adapter has on the wire when sent as `wire_dtype`."""
    return tuple(TensorLayout(name, wire_dtype, tuple(int(d) for d in a.shape)) for name, a in adapter.items())


def manifest_of(layout: Iterable[TensorLayout]) -> pb.AdapterManifest:
    layout = tuple(layout)
    return pb.AdapterManifest(
        tensors=[pb.TensorSpec(name=t.name, dtype=t.dtype, shape=t.shape) for t in layout],
        total_bytes=sum(t.nbytes for t in layout),
    )


def parse_manifest(manifest: pb.AdapterManifest, max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES) -> tuple[TensorLayout, ...]:
    """Check a received manifest and return its layout; raise AdapterError naming the fault.

    The same manifest arrives with every reply of every round, so the layouts of manifests up to
    CACHED_MANIFEST_BYTES are remembered by their serialised bytes (refusals are not).
    """
    serialized = manifest.SerializeToString()
    if len(serialized) <= CACHED_MANIFEST_BYTES:
        return _parse_serialized(serialized, max_bytes)
    return _parse(manifest, max_bytes)


@functools.lru_cache(maxsize=16)
def _parse_serialized(serialized: bytes, max_bytes: int) -> tuple[TensorLayout, ...]:
    return _parse(pb.AdapterManifest.FromString(serialized), max_bytes)


def _parse(manifest: pb.AdapterManifest, max_bytes: int) -> tuple[TensorLayout, ...]:
    if len(manifest.tensors) > MAX_TENSORS:
        raise AdapterError(f"manifest lists {len(manifest.tensors)} tensors, more than {MAX_TENSORS}")
    layout: list[TensorLayout] = []
    seen: set[str] = set()
    total = 0
    for spec in manifest.tensors:
        if not spec.name:
            raise AdapterError("manifest has a tensor without a name")
        if spec.name in seen:
            raise AdapterError(f"tensor {spec.name!r} appears twice in the manifest")
        seen.add(spec.name)
        if spec.dtype not in _STORAGE:
            raise AdapterError(f"tensor {spec.name!r} has {dtype_name(spec.dtype)}; allowed: {', '.join(_NAMES.values())}")
        if len(spec.shape) > MAX_RANK:
            raise AdapterError(f"tensor {spec.name!r} has rank {len(spec.shape)}, more than {MAX_RANK}")
        tensor = TensorLayout(spec.name, spec.dtype, tuple(spec.shape))
        total += tensor.nbytes  # Python ints: no overflow however large the declared dimensions
        if total > max_bytes:
            raise AdapterTooLarge(f"adapter declares more than {max_bytes} bytes (at tensor {spec.name!r})")
        # An empty tensor's other dimensions must fit too: numpy cannot shape an array by them.
        if math.prod(d for d in tensor.shape if d) * _STORAGE[tensor.dtype].itemsize > max_bytes:
            shape = list(tensor.shape)
            raise AdapterError(f"tensor {spec.name!r} has shape {shape}, past the {max_bytes}-byte cap")
        layout.append(tensor)
    if manifest.total_bytes != total:
        raise AdapterError(f"manifest declares {manifest.total_bytes} bytes but its tensors need {total}")
    return tuple(layout)


def check_layout(actual: Sequence[TensorLayout], expected: Sequence[TensorLayout], *, match_dtype: bool = True) -> None:
    """Raise AdapterError unless both layouts have the same keys, each with the same shape (and dtype)."""
    if tuple(actual) == tuple(expected):
        return
    have = {t.name: t for t in actual}
    want = {t.name: t for t in expected}
    missing = sorted(want.keys() - have.keys())
    extra = sorted(have.keys() - want.keys())
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys {_some(missing)}")
        if extra:
            parts.append(f"unexpected keys {_some(extra)}")
        raise AdapterError("key mismatch: " + "; ".join(parts))
    for name, w in want.items():
        h = have[name]
        if h.shape != w.shape:
            raise AdapterError(f"tensor {name!r} has shape {list(h.shape)}, expected {list(w.shape)}")
        if h.dtype != w.dtype and (match_dtype or h.dtype not in WIRE_DTYPES.values()):
            raise AdapterError(f"tensor {name!r} has {dtype_name(h.dtype)}, expected {dtype_name(w.dtype)}")


def check_finite(adapter: Mapping[str, np.ndarray]) -> None:
    """Raise AdapterError naming the first tensor that holds NaN or Inf."""
    for name, array in adapter.items():
        if not np.isfinite(array).all():
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            raise AdapterError(f"tensor {name!r} has {bad} non-finite values (NaN or Inf)")


def _some(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _to_wire(array: np.ndarray, dtype: int) -> np.ndarray:
    """The array's wire bytes as a flat uint8 array: a view when it is already in the wire dtype."""
    if dtype == pb.DATA_TYPE_BFLOAT16:
        values = np.ascontiguousarray(array, dtype="<f4")
        bits = values.view("<u4")
        # Round to nearest, ties to even: add 0x7FFF plus bit 16 (the lowest bit kept), drop 16 bits.
        rounded = bits >> 16
        rounded &= 1
        rounded += 0x7FFF
        rounded += bits
        rounded >>= 16
        wire = rounded.astype("<u2")
        wire[np.isnan(values)] = 0x7FC0  # the carry can turn a NaN into Inf or zero
    else:
        wire = np.ascontiguousarray(array, dtype=_STORAGE[dtype])
    return wire.reshape(-1).view(np.uint8)


def _cut(parts: Iterable[np.ndarray], size: int) -> Iterator[bytes]:
    """The concatenation of flat uint8 arrays in pieces of `size` bytes, each byte copied once."""
    pending: list[np.ndarray] = []
    room = size
    for part in parts:
        while part.size:
            pending.append(part[:room])
            part = part[room:]
            room -= pending[-1].size
            if room == 0:
                yield b"".join(pending)
                pending, room = [], size
    if pending:
        yield b"".join(pending)


def _from_wire(buffer: bytes | np.ndarray, offset: int, tensor: TensorLayout) -> np.ndarray:
    """A read-only view of one tensor in the payload; bfloat16 is widened into a new float32 array."""
    storage = _STORAGE[tensor.dtype]
    count = math.prod(tensor.shape)
    flat = np.frombuffer(buffer, dtype=storage, count=count, offset=offset)
    if tensor.dtype == pb.DATA_TYPE_BFLOAT16:
        wide = flat.astype("<u4")
        wide <<= 16
        flat = wide.view("<f4")
        flat.flags.writeable = False
    return flat.reshape(tensor.shape)


@dataclass(frozen=True)
class EncodedAdapter:
    """An adapter ready to send: encode once, stream to any number of peers."""

    manifest: pb.AdapterManifest
    chunks: tuple[pb.AdapterChunk, ...]


def encode(
    adapter: Mapping[str, np.ndarray],
    wire_dtype: int = pb.DATA_TYPE_FLOAT32,
    chunk_bytes: int = CHUNK_BYTES,
) -> EncodedAdapter:
    """Serialise an adapter into a manifest and chunks of at most `chunk_bytes` payload bytes."""
    if wire_dtype not in _STORAGE:
        raise AdapterError(f"cannot send {dtype_name(wire_dtype)}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    layout = layout_of(adapter, wire_dtype)
    parts = (_to_wire(a, wire_dtype) for a in adapter.values())
    chunks = tuple(pb.AdapterChunk(index=i, data=data) for i, data in enumerate(_cut(parts, chunk_bytes)))
    return EncodedAdapter(manifest_of(layout), chunks)


class AdapterAssembler:
    """Rebuilds one adapter from a manifest and its chunks, checking each step.

    Pass `expected` to also require the same keys, shapes and dtypes as a reference layout;
    `match_dtype=False` accepts any of the adapter wire dtypes (WIRE_DTYPES).
    A payload that arrives in one chunk is viewed in place; one in several chunks is copied into
    a buffer allocated when the first of them arrives.
    """

    def __init__(
        self,
        manifest: pb.AdapterManifest,
        *,
        expected: Sequence[TensorLayout] | None = None,
        match_dtype: bool = True,
        max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
        max_chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.layout = parse_manifest(manifest, max_bytes)
        if expected is not None:
            check_layout(self.layout, expected, match_dtype=match_dtype)
        self.total_bytes = manifest.total_bytes
        self._max_chunk = max_chunk_bytes
        self._payload: bytes | np.ndarray = b""
        self._received = 0
        self._next_index = 0

    @property
    def complete(self) -> bool:
        """Whether the chunks so far hold every byte the manifest declares."""
        return self._received == self.total_bytes

    def add(self, chunk: pb.AdapterChunk) -> int:
        """Take the next chunk; return its payload size."""
        if chunk.index != self._next_index:
            if chunk.index < self._next_index:
                raise AdapterError(f"chunk {chunk.index} arrived twice")
            raise AdapterError(f"chunk {self._next_index} is missing (got chunk {chunk.index})")
        data = chunk.data  # each read of a protobuf bytes field makes a new copy: read it once
        size = len(data)
        if size == 0 or size > self._max_chunk:
            raise AdapterError(f"chunk {chunk.index} has {size} bytes; allowed 1 to {self._max_chunk}")
        if self._received + size > self.total_bytes:
            raise AdapterError(f"chunk {chunk.index} runs past the {self.total_bytes} bytes the manifest declares")
        if size == self.total_bytes:
            self._payload = data
        else:
            if not isinstance(self._payload, np.ndarray):
                self._payload = np.empty(self.total_bytes, dtype=np.uint8)
            self._payload[self._received : self._received + size] = np.frombuffer(data, dtype=np.uint8)
        self._received += size
        self._next_index += 1
        return size

    def finish(self, *, require_finite: bool = False) -> Adapter:
        """The adapter; with `require_finite`, raise AdapterError naming a tensor that holds NaN or Inf."""
        if self._received != self.total_bytes:
            raise AdapterError(f"stream ended after {self._received} of {self.total_bytes} bytes")
        if isinstance(self._payload, np.ndarray):
            self._payload.flags.writeable = False
        adapter: Adapter = {}
        offset = 0
        for tensor in self.layout:
            adapter[tensor.name] = _from_wire(self._payload, offset, tensor)
            offset += tensor.nbytes
        if require_finite and not self._finite_in_one_pass():
            check_finite(adapter)
        return adapter

    def _finite_in_one_pass(self) -> bool:
        """True when the payload is of one IEEE dtype and all finite: one numpy call, not one per tensor.

        False means "not shown": bfloat16, mixed dtypes, or a non-finite value to be named.
        """
        storage = {_STORAGE[t.dtype] for t in self.layout}
        if len(storage) != 1 or (dtype := storage.pop()).kind != "f":
            return False
        return bool(np.isfinite(np.frombuffer(self._payload, dtype=dtype)).all())


def decode(
    manifest: pb.AdapterManifest,
    chunks: Iterable[pb.AdapterChunk],
    *,
    expected: Sequence[TensorLayout] | None = None,
    max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
) -> Adapter:
    """Decode a complete adapter (the synchronous form of AdapterAssembler)."""
    assembler = AdapterAssembler(manifest, expected=expected, max_bytes=max_bytes)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()
