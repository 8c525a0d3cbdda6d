"""Which data a site trains on: the data source and how one data set is split into sites."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from phalanx.data import DEFAULT_DATASET, DataError, TextDataset, load_dataset
from phalanx.partition import Partition, load_partition


@dataclass(frozen=True)
class DataConfig:
    source: str = DEFAULT_DATASET
    """A packaged data set name ("tweets", "bbc-news") or a CSV / JSON Lines / Parquet path."""
    text_column: str = "text"
    label_column: str = "label"
    partitioner: str = "iid"
    """How one data set is split into simulated sites: "iid" or "dirichlet" (label skew)."""
    alpha: float = 0.5
    """Dirichlet concentration: smaller means more label skew between sites."""
    test_fraction: float = 0.1
    seed: int = 0
    label_names: tuple[str, ...] = ()
    """The run's label set in class-id order; empty means the sorted labels found in the data."""
    holdout: int = 0
    """Rows of the data set held out from every site (a global test set); 0 keeps all."""


def relabel(dataset: TextDataset, label_names: Sequence[str]) -> TextDataset:
    """The same examples with class ids into `label_names` (a site may lack some classes)."""
    unknown = sorted(set(dataset.label_names) - set(label_names))
    if unknown:
        raise DataError(f"labels {unknown} in the data are not among the run's labels {list(label_names)}")
    position = {name: i for i, name in enumerate(label_names)}
    mapping = np.array([position[name] for name in dataset.label_names], dtype=np.int64)
    return TextDataset(dataset.texts, mapping[dataset.labels], tuple(label_names))


def load_source(config: DataConfig) -> TextDataset:
    dataset = load_dataset(config.source, text_column=config.text_column, label_column=config.label_column)
    return relabel(dataset, config.label_names) if config.label_names else dataset


_HOLDOUT_STREAM = 0x401D
"""Mixed into the seed of the held-out rows' draw, so it is independent of the partitioner's."""


def split_holdout(config: DataConfig) -> tuple[TextDataset, TextDataset]:
    """The rows held out from every site, and the rows the sites share, each in the source's order.

    The held-out rows are the first `config.holdout` of a permutation seeded by `config.seed`
    (in a stream of its own), so every process draws the same ones.
    """
    dataset = load_source(config)
    if not 0 <= config.holdout < len(dataset):
        raise DataError(
            f"holdout must lie in [0, {len(dataset)}) to leave rows for the sites: "
            f"{config.source} holds {len(dataset)} rows, holdout is {config.holdout}"
        )
    if config.holdout == 0:
        return dataset.subset(np.empty(0, dtype=np.int64)), dataset
    order = np.random.default_rng([config.seed, _HOLDOUT_STREAM]).permutation(len(dataset))
    return dataset.subset(np.sort(order[: config.holdout])), dataset.subset(np.sort(order[config.holdout :]))


def load_holdout(config: DataConfig) -> TextDataset:
    """The global test set: the `config.holdout` rows that no site trains or tests on."""
    return split_holdout(config)[0]


def load_site(config: DataConfig, partition: int, num_partitions: int) -> Partition:
    """The train and test split of one site: partition `partition` of `num_partitions` of the rows kept."""
    return load_partition(
        split_holdout(config)[1],
        partition,
        num_partitions,
        scheme=config.partitioner,
        alpha=config.alpha,
        seed=config.seed,
        test_fraction=config.test_fraction,
    )
