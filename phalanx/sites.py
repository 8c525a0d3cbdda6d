"""Which data a site trains on: the data source and how one data set is split into sites."""

from __future__ import annotations

from dataclasses import dataclass

from phalanx.data import DEFAULT_DATASET, TextDataset, load_dataset
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


def load_source(config: DataConfig) -> TextDataset:
    return load_dataset(config.source, text_column=config.text_column, label_column=config.label_column)


def load_site(config: DataConfig, partition: int, num_partitions: int) -> Partition:
    """The train and test split of one site: partition `partition` of `num_partitions`."""
    return load_partition(
        load_source(config),
        partition,
        num_partitions,
        scheme=config.partitioner,
        alpha=config.alpha,
        seed=config.seed,
        test_fraction=config.test_fraction,
    )
