"""Adapter codec: round trips, chunking and every way a malformed stream is refused."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest

from phalanx.codec import (
    CHUNK_BYTES,
    WIRE_DTYPES,
    AdapterAssembler,
    AdapterError,
    AdapterTooLarge,
    check_finite,
    check_layout,
    decode,
    encode,
    layout_of,
    parse_manifest,
)
from phalanx.streams import chunk_message_size
from phalanx.v1 import adapter_pb2 as pb
from phalanx.v1 import trainer_pb2


def sample_adapter(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "a.lora_A.weight": rng.standard_normal((8, 384), dtype=np.float32),
        "a.lora_B.weight": rng.standard_normal((384, 8), dtype=np.float32),
        "odd": rng.standard_normal((3, 5, 7), dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "scalar": np.array(2.5, dtype=np.float32),
        "bias": rng.standard_normal(3, dtype=np.float32),
    }


@pytest.mark.parametrize("chunk_bytes", [1, 7, 4096, CHUNK_BYTES])
def test_float32_round_trip_is_exact_for_any_chunk_size(chunk_bytes: int) -> None:
    adapter = sample_adapter(np.random.default_rng(0))
    encoded = encode(adapter, chunk_bytes=chunk_bytes)
    assert all(len(c.data) <= chunk_bytes for c in encoded.chunks)
    assert [c.index for c in encoded.chunks] == list(range(len(encoded.chunks)))
    decoded = decode(encoded.manifest, encoded.chunks, expected=layout_of(adapter))
    assert list(decoded) == list(adapter)
    for name, array in adapter.items():
        assert decoded[name].shape == array.shape
        np.testing.assert_array_equal(decoded[name], array)


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
def test_every_allowed_dtype_round_trips_within_its_precision(dtype: str) -> None:
    adapter = sample_adapter(np.random.default_rng(1))
    code = WIRE_DTYPES[dtype]
    encoded = encode(adapter, wire_dtype=code, chunk_bytes=1000)
    assert {t.dtype for t in encoded.manifest.tensors} == {code}
    decoded = decode(encoded.manifest, encoded.chunks, expected=layout_of(adapter, code))
    tolerance = {"float64": 0, "float32": 0, "float16": 1e-3, "bfloat16": 8e-3}[dtype]
    for name, array in adapter.items():
        np.testing.assert_allclose(decoded[name].astype(np.float32), array, rtol=tolerance, atol=tolerance)


def test_half_precision_halves_the_payload() -> None:
    adapter = sample_adapter(np.random.default_rng(2))
    full = encode(adapter).manifest.total_bytes
    assert encode(adapter, wire_dtype=WIRE_DTYPES["bfloat16"]).manifest.total_bytes * 2 == full
    assert encode(adapter, wire_dtype=WIRE_DTYPES["float16"]).manifest.total_bytes * 2 == full


def test_bfloat16_rounds_to_nearest_even() -> None:
    # 1 + 2^-8 lies exactly between two bfloat16 values: ties go to the even one (1.0).
    values = np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.0], dtype=np.float32)
    encoded = encode({"x": values}, wire_dtype=pb.DATA_TYPE_BFLOAT16)
    decoded = decode(encoded.manifest, encoded.chunks)["x"]
    np.testing.assert_array_equal(decoded, np.array([1.0, 1.0 + 2**-6, -2.0], dtype=np.float32))


def test_bfloat16_keeps_nan_whatever_its_payload() -> None:
    # Rounding adds a carry below bit 16: on these NaNs it would spill into the sign or exponent.
    nans = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7FC00000], dtype=np.uint32).view(np.float32)
    encoded = encode({"x": nans}, wire_dtype=pb.DATA_TYPE_BFLOAT16)
    assert np.isnan(decode(encoded.manifest, encoded.chunks)["x"]).all()


def base_object(array: np.ndarray) -> object:
    """The object that finally owns an array's memory."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array.base


def test_payload_in_one_chunk_is_viewed_in_place_and_read_only() -> None:
    encoded = encode(sample_adapter(np.random.default_rng(3)))
    assert len(encoded.chunks) == 1
    decoded = decode(encoded.manifest, encoded.chunks)
    owners = {id(base_object(a)) for a in decoded.values()}
    assert len(owners) == 1 and isinstance(base_object(decoded["odd"]), bytes)
    assert not any(a.flags.writeable for a in decoded.values())


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
def test_payload_in_many_chunks_is_copied_into_one_read_only_buffer(dtype: str) -> None:
    encoded = encode(sample_adapter(np.random.default_rng(4)), wire_dtype=WIRE_DTYPES[dtype], chunk_bytes=100)
    decoded = decode(encoded.manifest, encoded.chunks)
    assert not any(a.flags.writeable for a in decoded.values())
    if dtype != "bfloat16":  # bfloat16 is widened into new arrays
        assert len({id(base_object(a)) for a in decoded.values()}) == 1
    with pytest.raises(ValueError, match="read-only"):
        decoded["bias"][0] = 1.0


def test_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_bytes must be positive"):
        encode({"w": np.ones(2, dtype=np.float32)}, chunk_bytes=0)


def test_empty_adapter_round_trips() -> None:
    encoded = encode({})
    assert encoded.chunks == ()
    assert decode(encoded.manifest, encoded.chunks) == {}


def manifest(*tensors: tuple[str, int, tuple[int, ...]], total: int | None = None) -> pb.AdapterManifest:
    specs = [pb.TensorSpec(name=n, dtype=d, shape=s) for n, d, s in tensors]
    if total is None:
        total = sum(int(np.prod(s)) * {1: 4, 2: 2, 3: 2, 4: 8}[d] for _, d, s in tensors)
    return pb.AdapterManifest(tensors=specs, total_bytes=total)


def test_byte_count_must_match_the_shapes_before_anything_is_read() -> None:
    with pytest.raises(AdapterError, match="declares 100 bytes but its tensors need 96"):
        AdapterAssembler(manifest(("w", pb.DATA_TYPE_FLOAT32, (4, 6)), total=100))


@pytest.mark.parametrize("code", [pb.DATA_TYPE_UNSPECIFIED, 99])
def test_unknown_dtype_is_named(code: int) -> None:
    with pytest.raises(AdapterError, match="tensor 'w' has .*allowed: float32"):
        AdapterAssembler(manifest(("w", code, (2,)), total=8))


def test_duplicate_and_nameless_tensors_are_refused() -> None:
    with pytest.raises(AdapterError, match="appears twice"):
        AdapterAssembler(manifest(("w", 1, (2,)), ("w", 1, (2,))))
    with pytest.raises(AdapterError, match="without a name"):
        AdapterAssembler(manifest(("", 1, (2,))))


def test_oversized_adapter_is_refused_before_allocation() -> None:
    huge = manifest(("w", pb.DATA_TYPE_FLOAT64, (2**40, 2**20)))
    with pytest.raises(AdapterTooLarge, match="more than 1048576 bytes"):
        AdapterAssembler(huge, max_bytes=1 << 20)


@pytest.mark.parametrize("shape", [(0, 2**63), (0, 2**40, 2**40), (2**64 - 1, 0)])
def test_empty_tensor_with_huge_dimensions_is_refused(shape: tuple[int, ...]) -> None:
    # No bytes, but numpy cannot build an array of this shape.
    with pytest.raises(AdapterError, match=r"tensor 'w' has shape \[.*\], past the 1048576-byte cap"):
        AdapterAssembler(manifest(("w", pb.DATA_TYPE_FLOAT32, shape), total=0), max_bytes=1 << 20)


def stream(chunk_bytes: int = 16) -> tuple[pb.AdapterManifest, list[pb.AdapterChunk]]:
    encoded = encode({"w": np.arange(20, dtype=np.float32)}, chunk_bytes=chunk_bytes)
    return encoded.manifest, list(encoded.chunks)


def test_truncated_stream_is_refused() -> None:
    m, chunks = stream()
    with pytest.raises(AdapterError, match="stream ended after 64 of 80 bytes"):
        decode(m, chunks[:-1])


def test_gap_in_chunk_indices_is_refused() -> None:
    m, chunks = stream()
    with pytest.raises(AdapterError, match="chunk 1 is missing"):
        decode(m, [chunks[0], chunks[2]])


def test_duplicate_chunk_is_refused_even_with_different_bytes() -> None:
    m, chunks = stream()
    forged = pb.AdapterChunk(index=0, data=b"\xff" * 16)
    with pytest.raises(AdapterError, match="chunk 0 arrived twice"):
        decode(m, [chunks[0], forged, *chunks[1:]])


def test_chunk_running_past_the_manifest_is_refused() -> None:
    m, chunks = stream()
    with pytest.raises(AdapterError, match="runs past the 80 bytes"):
        decode(m, [*chunks, pb.AdapterChunk(index=len(chunks), data=b"x")])


def test_oversized_chunk_is_refused() -> None:
    m, _ = stream()
    assembler = AdapterAssembler(m, max_chunk_bytes=8)
    with pytest.raises(AdapterError, match="chunk 0 has 80 bytes; allowed 1 to 8"):
        assembler.add(pb.AdapterChunk(index=0, data=b"\0" * 80))


UNPICKLED: list[str] = []


def _record_unpickling(marker: str) -> None:
    UNPICKLED.append(marker)


class _RunsCodeWhenUnpickled:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _record_unpickling, ("code ran",)


def as_chunks(payload: bytes) -> list[pb.AdapterChunk]:
    starts = range(0, len(payload), CHUNK_BYTES)
    return [pb.AdapterChunk(index=i, data=payload[s : s + CHUNK_BYTES]) for i, s in enumerate(starts)]


def test_pickle_bytes_are_plain_bytes() -> None:
    payload = pickle.dumps({"w": _RunsCodeWhenUnpickled()})  # would run code if it were unpickled
    count = len(payload) // 4
    decoded = decode(manifest(("w", pb.DATA_TYPE_FLOAT32, (count,))), as_chunks(payload[: 4 * count]))
    assert decoded["w"].tobytes() == payload[: 4 * count]  # decoding reads it as numbers
    with pytest.raises(AdapterError):
        decode(manifest(("w", pb.DATA_TYPE_FLOAT32, (4,))), as_chunks(payload))
    assert UNPICKLED == []


def test_gzip_bomb_is_plain_bytes() -> None:
    bomb = gzip.compress(bytes(100 << 20))  # about 100 kB that inflate to 100 MB
    count = len(bomb) // 4
    decoded = decode(manifest(("w", pb.DATA_TYPE_FLOAT32, (count,))), as_chunks(bomb[: 4 * count]))
    assert decoded["w"].tobytes() == bomb[: 4 * count]
    with pytest.raises(AdapterError, match=f"stream ended after {len(bomb)} of {100 << 20} bytes"):
        decode(manifest(("w", pb.DATA_TYPE_FLOAT32, (25 << 20,))), as_chunks(bomb))


def test_layout_check_names_missing_extra_shape_and_dtype() -> None:
    reference = layout_of({"a": np.zeros((2, 3)), "b": np.zeros(4)})
    with pytest.raises(AdapterError, match="missing keys 'b'"):
        check_layout(layout_of({"a": np.zeros((2, 3))}), reference)
    with pytest.raises(AdapterError, match="unexpected keys 'c'"):
        check_layout(layout_of({"a": np.zeros((2, 3)), "b": np.zeros(4), "c": np.zeros(1)}), reference)
    with pytest.raises(AdapterError, match=r"'a' has shape \[3, 2\], expected \[2, 3\]"):
        check_layout(layout_of({"a": np.zeros((3, 2)), "b": np.zeros(4)}), reference)
    with pytest.raises(AdapterError, match="'a' has float16, expected float32"):
        check_layout(layout_of({"a": np.zeros((2, 3)), "b": np.zeros(4)}, pb.DATA_TYPE_FLOAT16), reference)


def test_expected_layout_is_enforced_while_decoding() -> None:
    encoded = encode({"a": np.zeros((2, 3), dtype=np.float32)})
    with pytest.raises(AdapterError, match="shape"):
        AdapterAssembler(encoded.manifest, expected=layout_of({"a": np.zeros((3, 2))}))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_named(bad: float) -> None:
    adapter = {"ok": np.ones(3, dtype=np.float32), "w": np.array([1.0, bad, bad], dtype=np.float32)}
    with pytest.raises(AdapterError, match="tensor 'w' has 2 non-finite values"):
        check_finite(adapter)


def test_chunk_message_size_is_the_serialised_size() -> None:
    for index in (0, 1, 127, 128, 20_000):
        for size in (1, 127, 128, 16_383, 16_384, CHUNK_BYTES):
            chunk = pb.AdapterChunk(index=index, data=bytes(size))
            for message in (trainer_pb2.TrainRequest(chunk=chunk), trainer_pb2.TrainResponse(chunk=chunk)):
                assert chunk_message_size(index, size) == message.ByteSize() == len(message.SerializeToString())


def test_manifest_checks_are_remembered_but_refusals_are_not() -> None:
    manifest = encode({"w": np.zeros((4, 4), dtype=np.float32)}).manifest
    first = parse_manifest(manifest)
    assert parse_manifest(pb.AdapterManifest.FromString(manifest.SerializeToString())) is first
    with pytest.raises(AdapterTooLarge):
        parse_manifest(manifest, max_bytes=63)  # the cap is part of what is remembered
    manifest.total_bytes += 1
    for _ in range(2):
        with pytest.raises(AdapterError, match="but its tensors need 64"):
            parse_manifest(manifest)


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
def test_assembler_names_the_non_finite_tensor_in_any_wire_dtype(dtype: str) -> None:
    adapter = {"ok": np.ones(300, dtype=np.float32), "w": np.array([1.0, np.nan, np.inf], dtype=np.float32)}
    encoded = encode(adapter, wire_dtype=WIRE_DTYPES[dtype])
    assembler = AdapterAssembler(encoded.manifest)
    for chunk in encoded.chunks:
        assembler.add(chunk)
    assert np.isnan(assembler.finish()["w"][1])  # decoding alone keeps the values
    with pytest.raises(AdapterError, match="tensor 'w' has 2 non-finite values"):
        assembler.finish(require_finite=True)


def test_masked_words_travel_as_uint32_but_never_pass_for_an_adapter() -> None:
    words = {"secagg.masked": np.array([0, 1, 2**31, 2**32 - 1], dtype=np.uint32)}
    encoded = encode(words, pb.DATA_TYPE_UINT32)
    decoded = decode(encoded.manifest, encoded.chunks, expected=layout_of(words, pb.DATA_TYPE_UINT32))
    assert decoded["secagg.masked"].dtype == np.uint32 and np.array_equal(decoded["secagg.masked"], words["secagg.masked"])
    # A trainer takes the global adapter in any float wire dtype, but not as integers.
    adapter = {"secagg.masked": np.zeros(4, dtype=np.float32)}
    with pytest.raises(AdapterError, match="has uint32, expected float32"):
        check_layout(layout_of(words, pb.DATA_TYPE_UINT32), layout_of(adapter), match_dtype=False)
