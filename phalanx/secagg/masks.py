"""Quantisation into Z_{2^32} and the mask streams that hide a site's words.

Quantisation, for n participants, range R and the site's weight share w (its weight over the sum
of the participants' weights, so the shares of all participants add up to at most 1):

    q = round(w · clip(x, -R, R) · L / R),  L = 2^31 - 1 - n

|q| <= w·L + 1/2, so the sum over any subset of participants stays below 2^31 in magnitude and
reads back exactly as a signed 32-bit integer. Rounding to nearest is off by at most half a level
per site, so a decoded weighted sum of s sites is within s·R / (2L) of the true one per
coordinate (the bound the tests check), and the weighted mean within s·R / (2L·W) for the
survivors' weight share W.

Masks are ChaCha20 keystreams keyed by a 32-byte seed, read as little-endian uint32 words.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from phalanx.secagg.errors import SecAggError

_NONCE = bytes(16)  # every seed keys one stream only: seeds are fresh per round and per pair
_SLACK = 64  # update_into wants room for a block beyond the data


def levels(participants: int) -> int:
    return 2**31 - 1 - participants


def quantise(
    update: np.ndarray, weight_share: float, clip_range: float, participants: int
) -> tuple[np.ndarray, int]:
    """The update as uint32 words, and how many of its coordinates were clipped to the range."""
    if not 0 < weight_share <= 1:
        raise ValueError(f"a weight share is in (0, 1], got {weight_share}")
    x = np.asarray(update, dtype=np.float64)
    if np.isnan(x).any():  # no value to clip: the cast would make it -2^31 and wreck the sum unseen
        raise SecAggError(f"the update has {int(np.count_nonzero(np.isnan(x)))} NaN coordinates")
    clipped = int(np.count_nonzero(np.abs(x) > clip_range))
    scaled = np.clip(x, -clip_range, clip_range) * (weight_share * levels(participants) / clip_range)
    return np.rint(scaled).astype(np.int32).view(np.uint32), clipped


def dequantise(total: np.ndarray, clip_range: float, participants: int) -> np.ndarray:
    """The weighted sum that a sum of quantised words stands for (float64)."""
    return total.view(np.int32).astype(np.float64) * (clip_range / levels(participants))


def error_bound(summed: int, clip_range: float, participants: int) -> float:
    """Largest per-coordinate error of a decoded sum of `summed` sites' quantised updates."""
    return summed * clip_range / (2 * levels(participants))


def add_stream(total: np.ndarray, seed: bytes, *, subtract: bool = False) -> None:
    """total ± the mask stream of `seed`, in place, mod 2^32."""
    words = _keystream_into(seed, total.size)
    if subtract:
        total -= words
    else:
        total += words


def stream(seed: bytes, length: int) -> np.ndarray:
    """`length` uniformly random uint32 words from the ChaCha20 keystream of `seed` (a new array)."""
    return _keystream_into(seed, length).copy()


_scratch = threading.local()


@functools.lru_cache(maxsize=4)
def _zeros(nbytes: int) -> bytes:
    return bytes(nbytes)


def _keystream_into(seed: bytes, length: int) -> np.ndarray:
    """The keystream of `seed` as words in this thread's scratch buffer (valid until its next call).

    Encrypting a cached block of zeros into a reused buffer costs a fraction of allocating both
    for every stream: a site masks with k + 1 streams of the adapter's size.
    """
    nbytes = 4 * length
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.size < nbytes + _SLACK:
        buffer = _scratch.buffer = np.empty(nbytes + _SLACK, dtype=np.uint8)
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    encryptor.update_into(_zeros(nbytes), buffer)
    return buffer[:nbytes].view("<u4")
