"""Aggregation strategies over key-matched adapters, vectorised with numpy.

Every strategy checks a reply against the global adapter's layout before it touches a value: a
reply whose key set or shapes differ raises AdapterError and is never partially averaged.

- `fedavg`: the weighted mean, accumulated reply by reply into one float32 running sum per key,
  so memory does not grow with the number of replies.
- `median`: the coordinate-wise median; unweighted, and robust to any minority of outliers.
- `trimmed-mean`: per coordinate, drop the `trim` share of largest and smallest values, then
  average the rest; unweighted.
- `krum` (Blanchard et al. 2017): score each reply by the summed squared L2 distances to its
  n − f − 2 nearest other replies (f: the number of Byzantine replies tolerated) and return the
  reply with the lowest score.
- `multi-krum`: the unweighted mean of the `keep` replies with the lowest Krum scores.

The robust strategies must hold every reply until the round ends. `clip_update` bounds each
update's L2 distance from the global adapter and works with any strategy.

`DpFedAvg` is the differentially private mean (see `phalanx.privacy`): replies already clipped,
weighted uniformly, summed, noised once, and divided by the number of sites sampled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from phalanx.codec import Adapter, AdapterError, TensorLayout, check_layout, layout_of
from phalanx.privacy import gaussian_noise

AGGREGATORS = ("fedavg", "median", "trimmed-mean", "krum", "multi-krum")
DEFAULT_TRIM = 0.2


class Aggregator:
    """Checks each reply's layout and weight, then hands it to `_add`."""

    def __init__(self, reference: Mapping[str, np.ndarray]) -> None:
        self._layout: tuple[TensorLayout, ...] = layout_of(reference)
        self._names = tuple(reference)
        self.count = 0

    def check(self, adapter: Mapping[str, np.ndarray], weight: float) -> None:
        """Raise AdapterError if `add` would refuse this reply."""
        if not (weight > 0 and math.isfinite(weight)):
            raise AdapterError(f"weight must be positive and finite, got {weight}")
        check_layout(layout_of(adapter), self._layout)

    def add(self, adapter: Mapping[str, np.ndarray], weight: float) -> None:
        self.check(adapter, weight)
        self._add(adapter, weight)
        self.count += 1

    def result(self) -> Adapter:
        if self.count == 0:
            raise ValueError("no replies to aggregate")
        return self._result()

    def _add(self, adapter: Mapping[str, np.ndarray], weight: float) -> None:
        raise NotImplementedError

    def _result(self) -> Adapter:
        raise NotImplementedError


class FedAvg(Aggregator):
    """Weighted mean (weights: example counts), accumulated reply by reply.

    Per key and reply: one multiply into a scratch buffer, one in-place add; no Python loop
    over elements and no per-reply allocation. Two replies give the same bits in either order.
    """

    def __init__(self, reference: Mapping[str, np.ndarray]) -> None:
        super().__init__(reference)
        self._sum = {name: np.zeros(np.shape(array), dtype=np.float32) for name, array in reference.items()}
        self._scratch = np.empty(max((a.size for a in self._sum.values()), default=0), dtype=np.float32)
        self._weight = 0.0

    def _add(self, adapter: Mapping[str, np.ndarray], weight: float) -> None:
        w = np.float32(weight)
        with np.errstate(over="ignore"):  # an overflow is Inf in the result, which the round refuses
            for name, total in self._sum.items():
                scaled = self._scratch[: total.size].reshape(total.shape)
                np.multiply(adapter[name], w, out=scaled)
                total += scaled
        self._weight += weight

    def _result(self) -> Adapter:
        scale = np.float32(1.0 / self._weight)
        return {name: total * scale for name, total in self._sum.items()}


class DpFedAvg(Aggregator):
    """global + (sum of the updates + N(0, noise_std²) per coordinate) / `sampled`.

    Weights are ignored: every reply counts once, so a site's influence is bounded by the clip
    norm its update was clipped to. `sampled` is fixed before replies arrive; a site that does
    not answer counts as a zero update.
    """

    def __init__(self, reference: Mapping[str, np.ndarray], *, sampled: int, noise_std: float) -> None:
        super().__init__(reference)
        self._reference = reference
        self._sum = {name: np.zeros(np.shape(array), dtype=np.float64) for name, array in reference.items()}
        self._sampled = sampled
        self._noise_std = noise_std

    def _add(self, adapter: Mapping[str, np.ndarray], weight: float) -> None:
        for name, total in self._sum.items():
            total += adapter[name]
            total -= self._reference[name]

    def _result(self) -> Adapter:
        noise = gaussian_noise(sum(total.size for total in self._sum.values()), self._noise_std)
        out: Adapter = {}
        offset = 0
        for name, total in self._sum.items():
            draw = noise[offset : offset + total.size].reshape(total.shape)
            offset += total.size
            out[name] = (self._reference[name] + (total + draw) / self._sampled).astype(np.float32)
        return out


class _Stacking(Aggregator):
    """Holds every reply; `_reduce` turns a (replies, *shape) stack into one tensor."""

    def __init__(self, reference: Mapping[str, np.ndarray]) -> None:
        super().__init__(reference)
        self._replies: list[Mapping[str, np.ndarray]] = []

    def _add(self, adapter: Mapping[str, np.ndarray], weight: float) -> None:
        self._replies.append(adapter)

    def _result(self) -> Adapter:
        return {
            name: self._reduce(np.stack([np.asarray(r[name], dtype=np.float32) for r in self._replies]))
            for name in self._names
        }

    def _reduce(self, stack: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class CoordinateMedian(_Stacking):
    def _reduce(self, stack: np.ndarray) -> np.ndarray:
        return np.median(stack, axis=0).astype(np.float32)


class TrimmedMean(_Stacking):
    def __init__(self, reference: Mapping[str, np.ndarray], trim: float = DEFAULT_TRIM) -> None:
        if not 0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        super().__init__(reference)
        self.trim = trim

    def _reduce(self, stack: np.ndarray) -> np.ndarray:
        k = int(self.trim * len(stack))
        kept = np.sort(stack, axis=0)[k : len(stack) - k]
        return kept.mean(axis=0, dtype=np.float32)


class Krum(_Stacking):
    """Blanchard et al. 2017: the reply closest to its n − f − 2 nearest neighbours.

    Each reply is flattened, keys in the reference's order. `byzantine` (f) defaults to the
    largest f with n >= 2f + 3; each score sums at least one and at most n − 1 neighbours.
    After `result`, `selected` holds the indices (in order of `add`) of the replies it returned
    and `scores` every reply's score; a reply holding NaN or Inf scores Inf.
    """

    def __init__(self, reference: Mapping[str, np.ndarray], byzantine: int | None = None) -> None:
        if byzantine is not None and byzantine < 0:
            raise ValueError(f"byzantine must be >= 0, got {byzantine}")
        super().__init__(reference)
        self.byzantine = byzantine
        self.selected: list[int] = []
        self.scores: list[float] = []

    def _result(self) -> Adapter:
        replies = self._replies
        n = len(replies)
        f = max(0, (n - 3) // 2) if self.byzantine is None else self.byzantine
        rows = [np.concatenate([np.ravel(r[k]) for k in self._names], dtype=np.float64) for r in replies]
        scores = _krum_scores(np.stack(rows), min(max(1, n - f - 2), n - 1))
        self.scores = scores.tolist()
        self.selected = sorted(np.argsort(scores, kind="stable")[: self._keep(n, f)].tolist())
        chosen = [replies[i] for i in self.selected]
        return {
            k: np.stack([np.asarray(r[k], dtype=np.float32) for r in chosen]).mean(axis=0, dtype=np.float32)
            for k in self._names
        }

    def _keep(self, n: int, f: int) -> int:
        return 1


class MultiKrum(Krum):
    """The unweighted mean of the `keep` lowest-scoring replies (default n − f, at least 1, at most n)."""

    def __init__(
        self, reference: Mapping[str, np.ndarray], byzantine: int | None = None, keep: int | None = None
    ) -> None:
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        super().__init__(reference, byzantine)
        self.keep = keep

    def _keep(self, n: int, f: int) -> int:
        return min(n, max(1, n - f) if self.keep is None else self.keep)


def _krum_scores(flat: np.ndarray, neighbours: int) -> np.ndarray:
    """Per row of `flat` (replies × coordinates): the summed squared distances to its `neighbours` nearest.

    Distances come from the Gram matrix of the rows centred on their coordinate-wise median, which keeps
    the honest replies' small distances accurate beside a gross outlier. Non-finite rows are infinitely far.
    """
    n = len(flat)
    finite = np.isfinite(flat).all(axis=1)
    distances = np.full((n, n), np.inf)
    if finite.any():
        centred = flat[finite] - np.median(flat[finite], axis=0)
        gram = centred @ centred.T
        squares = np.diag(gram)
        distances[np.ix_(finite, finite)] = np.maximum(squares[:, None] + squares[None, :] - 2 * gram, 0.0)
    np.fill_diagonal(distances, np.inf)
    return np.sort(distances, axis=1)[:, :neighbours].sum(axis=1)


def clip_update(
    reference: Mapping[str, np.ndarray], adapter: Mapping[str, np.ndarray], max_norm: float
) -> tuple[Adapter, float]:
    """Scale `adapter - reference` down to L2 norm `max_norm` if it is longer; return it and its norm."""
    norm = math.sqrt(sum(float(np.sum(np.square(adapter[k] - reference[k], dtype=np.float64))) for k in reference))
    if norm <= max_norm:
        return dict(adapter), norm
    scale = np.float32(max_norm / norm)
    return {k: reference[k] + (np.asarray(adapter[k], dtype=np.float32) - reference[k]) * scale for k in reference}, norm


def create_aggregator(
    name: str,
    reference: Mapping[str, np.ndarray],
    *,
    trim: float = DEFAULT_TRIM,
    byzantine: int | None = None,
    keep: int | None = None,
) -> Aggregator:
    """`trim` is for trimmed-mean; `byzantine` (f) for krum and multi-krum; `keep` for multi-krum."""
    if name == "fedavg":
        return FedAvg(reference)
    if name == "median":
        return CoordinateMedian(reference)
    if name == "trimmed-mean":
        return TrimmedMean(reference, trim)
    if name == "krum":
        return Krum(reference, byzantine)
    if name == "multi-krum":
        return MultiKrum(reference, byzantine, keep)
    raise ValueError(f"unknown aggregator {name!r}; choose from {', '.join(AGGREGATORS)}")
