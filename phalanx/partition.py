"""Deterministic partitioning of one data set into simulated sites, and train/test splits.

Every function draws from `np.random.default_rng` seeded by its arguments (never global random
state), so the same arguments give the same arrays in every process. Every index array returned
is sorted int64; the partitions of one call are disjoint and together cover every example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from phalanx.data import TextDataset

__all__ = [
    "PARTITIONERS",
    "Partition",
    "dirichlet_partition",
    "iid_partition",
    "load_partition",
    "partition_indices",
    "train_test_split",
]

PARTITIONERS = ("iid", "dirichlet")


def _check_count(num_examples: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be at least 1, got {num_partitions}")
    if num_examples < num_partitions:
        raise ValueError(f"cannot split {num_examples} examples into {num_partitions} non-empty partitions")


def _sorted(indices: np.ndarray) -> np.ndarray:
    return np.sort(indices).astype(np.int64, copy=False)


def iid_partition(num_examples: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """A random split of `range(num_examples)` into partitions whose sizes differ by at most one."""
    _check_count(num_examples, num_partitions)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [_sorted(part) for part in np.array_split(order, num_partitions)]


def dirichlet_partition(
    labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_partition_size: int = 10,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """A label-skewed split: each class is spread over partitions in Dirichlet(alpha) proportions.

    For each class, proportions p ~ Dir(alpha * 1) are drawn and the class's shuffled examples
    are cut at the cumulative proportions. Small alpha gives each partition few classes; large
    alpha approaches an IID split. Draws are repeated (continuing the same generator) until every
    partition holds at least `min_partition_size` examples, at most `max_tries` times.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    _check_count(len(labels), num_partitions)
    _check_alpha(alpha)
    if min_partition_size < 0:
        raise ValueError(f"min_partition_size must be non-negative, got {min_partition_size}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be at least 1, got {max_tries}")
    if min_partition_size * num_partitions > len(labels):
        raise ValueError(
            f"cannot give each of {num_partitions} partitions at least {min_partition_size} of "
            f"{len(labels)} examples"
        )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    sizes: list[int] = []
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for members in by_class:
            shuffled = rng.permutation(members)
            proportions = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(shuffled)).astype(np.int64)
            for part, piece in zip(parts, np.split(shuffled, cuts)):
                part.append(piece)
        sizes = [sum(len(piece) for piece in part) for part in parts]
        if min(sizes) >= min_partition_size:
            return [_sorted(np.concatenate(part)) for part in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split into {num_partitions} partitions gave each at least "
        f"{min_partition_size} examples in {max_tries} tries (last sizes: {sizes}); "
        f"use a larger alpha, fewer partitions or a smaller min_partition_size"
    )


def partition_indices(
    labels: np.ndarray, num_partitions: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Split the examples whose labels are `labels` with `scheme` (one of `PARTITIONERS`)."""
    _check_scheme(scheme)
    _check_alpha(alpha)
    if scheme == "iid":
        return iid_partition(len(labels), num_partitions, seed)
    return dirichlet_partition(labels, num_partitions, alpha, seed)


def train_test_split(indices: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random (train, test) split of `indices`, both sorted.

    The test part has round(len * test_fraction) indices, but at least one when there are two or
    more and `test_fraction` > 0, and never all of them.
    """
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    indices = np.asarray(indices)
    if indices.ndim != 1:
        raise ValueError(f"indices must be one-dimensional, got shape {indices.shape}")
    n = len(indices)
    num_test = round(n * test_fraction)
    if test_fraction > 0 and n >= 2:
        num_test = max(num_test, 1)
    num_test = min(num_test, max(n - 1, 0))
    shuffled = np.random.default_rng(seed).permutation(indices)
    return _sorted(shuffled[num_test:]), _sorted(shuffled[:num_test])


@dataclass(frozen=True)
class Partition:
    """One simulated site's data."""

    train: TextDataset
    test: TextDataset


def load_partition(
    dataset: TextDataset,
    partition: int,
    num_partitions: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.1,
) -> Partition:
    """Partition `partition` (0-based) of `num_partitions`, split into train and test.

    The partitioning depends only on the data set's labels, `scheme`, `alpha` and `seed`, so
    every site computes the same split and takes its own part.
    """
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be at least 1, got {num_partitions}")
    if not 0 <= partition < num_partitions:
        raise ValueError(f"partition must lie in [0, {num_partitions}), got {partition}")
    parts = partition_indices(dataset.labels, num_partitions, scheme=scheme, alpha=alpha, seed=seed)
    split_seed = int(np.random.SeedSequence([seed, partition]).generate_state(1)[0])
    train, test = train_test_split(parts[partition], test_fraction, split_seed)
    return Partition(train=dataset.subset(train), test=dataset.subset(test))


def _check_scheme(scheme: str) -> None:
    if scheme not in PARTITIONERS:
        raise ValueError(f"unknown partitioner {scheme!r}; expected one of: {', '.join(PARTITIONERS)}")


def _check_alpha(alpha: float) -> None:
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
