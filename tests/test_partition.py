"""Deterministic IID and Dirichlet partitioning, train/test splits, and `load_partition`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from phalanx.data import TextDataset
from phalanx.partition import (
    PARTITIONERS,
    Partition,
    dirichlet_partition,
    iid_partition,
    load_partition,
    partition_indices,
    train_test_split,
)

# 3,000 examples in 4 classes with unequal shares.
LABELS = np.random.default_rng(1).choice(4, size=3_000, p=[0.4, 0.3, 0.2, 0.1]).astype(np.int64)


def assert_cover(parts: list[np.ndarray], n: int) -> None:
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "sorted, without repeats"
    joined = np.concatenate(parts)
    assert len(joined) == n, "disjoint"
    assert np.array_equal(np.sort(joined), np.arange(n)), "complete"


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def mean_max_class_share(parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(LABELS[p], minlength=4).max() / len(p) for p in parts]))


def test_partitioners() -> None:
    assert PARTITIONERS == ("iid", "dirichlet")


@pytest.mark.parametrize("n, k", [(10, 3), (1_000, 7), (5, 5), (1, 1)])
def test_iid_covers_with_balanced_sizes(n: int, k: int) -> None:
    parts = iid_partition(n, k, seed=3)
    assert len(parts) == k
    assert_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_is_deterministic_and_seeded() -> None:
    assert same(iid_partition(100, 4, seed=0), iid_partition(100, 4, seed=0))
    assert not same(iid_partition(100, 4, seed=0), iid_partition(100, 4, seed=1))


@pytest.mark.parametrize("alpha", [0.1, 0.5, 100.0])
def test_dirichlet_covers(alpha: float) -> None:
    parts = dirichlet_partition(LABELS, 6, alpha, seed=0)
    assert len(parts) == 6
    assert_cover(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_is_deterministic_and_seeded() -> None:
    assert same(dirichlet_partition(LABELS, 5, 0.5, seed=7), dirichlet_partition(LABELS, 5, 0.5, seed=7))
    assert not same(dirichlet_partition(LABELS, 5, 0.5, seed=7), dirichlet_partition(LABELS, 5, 0.5, seed=8))


def test_dirichlet_skew_follows_alpha() -> None:
    iid = mean_max_class_share(iid_partition(len(LABELS), 10, seed=0))
    skewed = mean_max_class_share(dirichlet_partition(LABELS, 10, 0.1, seed=0))
    even = mean_max_class_share(dirichlet_partition(LABELS, 10, 100.0, seed=0))
    assert iid == pytest.approx(0.4, abs=0.05)
    assert skewed > 0.75
    assert skewed > iid + 0.3
    assert even == pytest.approx(iid, abs=0.05)
    global_shares = np.bincount(LABELS) / len(LABELS)
    for part in dirichlet_partition(LABELS, 10, 1_000.0, seed=0):
        assert np.allclose(np.bincount(LABELS[part], minlength=4) / len(part), global_shares, atol=0.05)


def test_dirichlet_honours_min_partition_size() -> None:
    unconstrained = [dirichlet_partition(LABELS, 10, 0.3, seed, min_partition_size=0) for seed in range(5)]
    assert min(len(p) for parts in unconstrained for p in parts) < 100
    for seed in range(5):
        parts = dirichlet_partition(LABELS, 10, 0.3, seed, min_partition_size=100)
        assert min(len(p) for p in parts) >= 100
        assert_cover(parts, len(LABELS))


def test_dirichlet_gives_up_with_the_sizes() -> None:
    with pytest.raises(ValueError, match=r"in 3 tries \(last sizes: \["):
        dirichlet_partition(LABELS, 30, 0.01, seed=0, min_partition_size=90, max_tries=3)
    with pytest.raises(ValueError, match="at least 200 of 3000"):
        dirichlet_partition(LABELS, 20, 0.5, seed=0, min_partition_size=200)


def test_dirichlet_accepts_string_labels() -> None:
    names = np.array(["a", "b", "c", "d"])[LABELS]
    assert same(dirichlet_partition(names, 4, 0.3, seed=2), dirichlet_partition(LABELS, 4, 0.3, seed=2))


def test_partition_indices_dispatches() -> None:
    assert same(partition_indices(LABELS, 3), iid_partition(len(LABELS), 3, 0))
    assert same(
        partition_indices(LABELS, 3, scheme="dirichlet", alpha=0.2, seed=4),
        dirichlet_partition(LABELS, 3, 0.2, 4),
    )


def test_partitions_are_the_same_in_another_process() -> None:
    code = (
        "import numpy as np; from phalanx.partition import partition_indices as p; "
        "labels = np.random.default_rng(1).choice(4, size=3000, p=[0.4, 0.3, 0.2, 0.1]); "
        "print([int(x.sum()) for x in p(labels, 5, 'dirichlet', 0.3, 9) + p(labels, 5, 'iid', 0.3, 9)])"
    )
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    out = run.stdout
    here = partition_indices(LABELS, 5, "dirichlet", 0.3, 9) + partition_indices(LABELS, 5, "iid", 0.3, 9)
    assert out.strip() == str([int(x.sum()) for x in here])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: iid_partition(10, 0, 0), "num_partitions must be at least 1"),
        (lambda: iid_partition(3, 4, 0), "cannot split 3 examples into 4"),
        (lambda: dirichlet_partition(LABELS, 0, 0.5, 0), "num_partitions must be at least 1"),
        (lambda: dirichlet_partition(LABELS, 2, 0.0, 0), "alpha must be a positive"),
        (lambda: dirichlet_partition(LABELS, 2, float("nan"), 0), "alpha must be a positive"),
        (lambda: dirichlet_partition(LABELS.reshape(2, -1), 2, 0.5, 0), "one-dimensional"),
        (lambda: dirichlet_partition(LABELS, 2, 0.5, 0, max_tries=0), "max_tries"),
        (lambda: dirichlet_partition(LABELS, 2, 0.5, 0, min_partition_size=-1), "min_partition_size"),
        (
            lambda: partition_indices(LABELS, 2, scheme="x"),
            "unknown partitioner 'x'; expected one of: iid, dirichlet$",
        ),
        (lambda: partition_indices(LABELS, 2, alpha=-1.0), "alpha must be a positive"),
        (lambda: train_test_split(np.arange(10), 1.0, 0), r"test_fraction must lie in \[0, 1\)"),
        (lambda: train_test_split(np.arange(10), -0.1, 0), r"test_fraction must lie in \[0, 1\)"),
    ],
)
def test_bad_arguments(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_train_test_split() -> None:
    indices = np.arange(100, 200)
    train, test = train_test_split(indices, 0.2, seed=5)
    assert len(test) == 20 and len(train) == 80
    assert train.dtype == test.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    assert np.array_equal(np.sort(np.concatenate([train, test])), indices)
    again = train_test_split(indices, 0.2, seed=5)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    assert not np.array_equal(train_test_split(indices, 0.2, seed=6)[1], test)


@pytest.mark.parametrize(
    "n, fraction, num_test",
    [
        (0, 0.1, 0), (1, 0.1, 0), (1, 0.9, 0), (2, 0.1, 1), (2, 0.9, 1),
        (10, 0.0, 0), (10, 0.04, 1), (10, 0.25, 2), (10, 0.99, 9),
    ],
)
def test_train_test_split_sizes(n: int, fraction: float, num_test: int) -> None:
    train, test = train_test_split(np.arange(n), fraction, seed=0)
    assert len(test) == num_test and len(train) == n - num_test


@pytest.fixture
def dataset() -> TextDataset:
    labels = LABELS[:200]
    texts = tuple(f"example {i} of class {y}" for i, y in enumerate(labels))
    return TextDataset(texts=texts, labels=labels, label_names=("a", "b", "c", "d"))


@pytest.mark.parametrize("scheme", PARTITIONERS)
def test_load_partition(dataset: TextDataset, scheme: str) -> None:
    sites = [load_partition(dataset, k, 4, scheme=scheme, seed=3, test_fraction=0.2) for k in range(4)]
    assert all(isinstance(site, Partition) for site in sites)
    seen = [text for site in sites for text in site.train.texts + site.test.texts]
    assert sorted(seen) == sorted(dataset.texts)
    for site in sites:
        assert site.train.label_names == site.test.label_names == dataset.label_names
        assert len(site.test) == round((len(site.train) + len(site.test)) * 0.2)
        for part in (site.train, site.test):
            for text, label in zip(part.texts, part.labels):
                assert text.endswith(f"class {label}")
    again = load_partition(dataset, 2, 4, scheme=scheme, seed=3, test_fraction=0.2)
    assert again.train.texts == sites[2].train.texts and again.test.texts == sites[2].test.texts
    other = load_partition(dataset, 2, 4, scheme=scheme, seed=4, test_fraction=0.2)
    assert other.train.texts != sites[2].train.texts


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(partition=4, num_partitions=4), r"partition must lie in \[0, 4\), got 4"),
        (dict(partition=-1, num_partitions=4), r"partition must lie in \[0, 4\), got -1"),
        (dict(partition=0, num_partitions=0), "num_partitions must be at least 1"),
        (dict(partition=0, num_partitions=201), "cannot split 200 examples into 201"),
        (dict(partition=0, num_partitions=2, scheme="shards"), "unknown partitioner"),
        (dict(partition=0, num_partitions=2, alpha=0.0), "alpha must be a positive"),
        (dict(partition=0, num_partitions=2, test_fraction=1.5), "test_fraction"),
    ],
)
def test_load_partition_rejects_bad_arguments(
    dataset: TextDataset, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_partition(dataset, **kwargs)
