"""The round's neighbour graph: a Harary graph H(k, n) over a permutation of the participants.

The permutation is drawn from a hash of the run, round and participant list, so the coordinator
and every site compute the same graph from what they already know, and nobody chooses it freely.
With k >= n - 1 the graph is complete (plain SecAgg).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

from phalanx.secagg.errors import SecAggError


def default_neighbours(n: int) -> int:
    """k for n participants: every other site up to 10 sites, then 2·⌈1.5·log2 n⌉ (18 at 50, 20 at 100, 30 at 1000).

    A site's privacy rests on fewer than t of its k neighbours colluding with the coordinator,
    and its recovery on at least t of them staying; both tails fall exponentially in k, so k
    grows with log n (Bell et al. 2020, Theorem 3.6), not with n.
    """
    if n <= 10:
        return max(n - 1, 1)
    return min(n - 1, 2 * math.ceil(1.5 * math.log2(n)))


def default_threshold(k: int) -> int:
    """t = ⌈2k/3⌉: more than k/2, so a site that reveals one share per peer never lets two kinds reach t."""
    return max(k // 2 + 1, math.ceil(2 * k / 3))


def check_params(n: int, k: int, t: int) -> None:
    """Raise SecAggError unless k neighbours and threshold t work for n participants."""
    if n < 3:
        raise SecAggError(
            f"secure aggregation needs at least 3 sites in a round (a sum of two reveals each to the other), got {n}"
        )
    if not 1 <= k:
        raise SecAggError(f"neighbours must be positive, got {k}")
    if k < n - 1 and k % 2:
        raise SecAggError(
            f"neighbours must be even unless every site is a neighbour (at least {n - 1}), got {k}"
        )
    degree = min(k, n - 1)
    if not degree / 2 < t <= degree:
        raise SecAggError(
            f"threshold must be more than half the {degree} neighbours and at most all of them, got {t}"
        )


def neighbours(participants: Sequence[str], k: int, seed: bytes) -> dict[str, frozenset[str]]:
    """Each participant's neighbours in the round's graph (symmetric, k of them, or all others)."""
    ring = _ring(participants, seed)
    return {site: _row(ring, i, k) for i, site in enumerate(ring)}


def neighbours_of(participants: Sequence[str], k: int, seed: bytes, site: str) -> frozenset[str]:
    """One participant's row of `neighbours`, without building the others."""
    ring = _ring(participants, seed)
    return _row(ring, ring.index(site), k)


def _ring(participants: Sequence[str], seed: bytes) -> list[str]:
    ring = list(participants)
    random.Random(seed).shuffle(ring)  # a public permutation from a public seed: nothing secret here
    return ring


def _row(ring: list[str], i: int, k: int) -> frozenset[str]:
    n = len(ring)
    if k >= n - 1:
        return frozenset(ring[:i] + ring[i + 1 :])
    half = k // 2
    return frozenset(ring[(i + d) % n] for d in range(-half, half + 1) if d)


def graph_seed(run_id: str, round_: int, attempt: int, participants: Sequence[str]) -> bytes:
    digest = hashlib.sha256(b"phalanx-secagg-graph-v1")
    for part in (run_id, str(round_), str(attempt), *participants):
        digest.update(len(part).to_bytes(4, "big") + part.encode())
    return digest.digest()
