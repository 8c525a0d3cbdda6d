"""A site's data mapped onto the run's label set, and the rows held out from every site."""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from phalanx.cli import add_common_arguments, data_config, model_and_data_flags
from phalanx.data import DataError, TextDataset
from phalanx.partition import load_partition
from phalanx.sites import DataConfig, load_holdout, load_site, load_source, relabel
from tests.conftest import toy_csv

SITES = 3


def test_relabel_maps_ids_onto_the_runs_label_order() -> None:
    site = TextDataset(texts=("a", "b", "c"), labels=np.array([0, 1, 0]), label_names=("neg", "pos"))
    mapped = relabel(site, ("neg", "neutral", "pos"))
    assert mapped.label_names == ("neg", "neutral", "pos")
    assert mapped.labels.tolist() == [0, 2, 0]
    assert mapped.texts == site.texts


def test_relabel_refuses_labels_outside_the_run() -> None:
    site = TextDataset(texts=("a",), labels=np.array([0]), label_names=("spam",))
    with pytest.raises(DataError, match=r"labels \['spam'\] in the data are not among"):
        relabel(site, ("neg", "pos"))


@pytest.fixture
def toy(tmp_path: Path) -> DataConfig:
    """The toy CSV: 240 rows whose texts are all different, so a text names its row."""
    return DataConfig(source=str(toy_csv(tmp_path / "toy.csv")), test_fraction=0.2, seed=3)


def _site_texts(config: DataConfig) -> list[tuple[str, ...]]:
    sites = [load_site(config, k, SITES) for k in range(SITES)]
    return [split.texts for site in sites for split in (site.train, site.test)]


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_the_holdout_and_the_sites_cover_every_row_once(toy: DataConfig, partitioner: str) -> None:
    config = replace(toy, holdout=40, partitioner=partitioner, alpha=0.3)
    held = load_holdout(config)
    assert len(held) == 40
    counts = Counter(text for texts in [held.texts, *_site_texts(config)] for text in texts)
    assert set(counts.values()) == {1}
    assert len(counts) == 240
    assert set(held.texts).isdisjoint(text for texts in _site_texts(config) for text in texts)


def test_held_out_rows_keep_their_labels_in_the_runs_label_order(toy: DataConfig) -> None:
    config = replace(toy, holdout=30, label_names=("positive", "neutral", "negative"))
    held = load_holdout(config)
    assert held.label_names == ("positive", "neutral", "negative")
    words = {
        "negative": {"awful", "terrible", "sad", "bad"},
        "neutral": {"table", "chair", "window", "door"},
        "positive": {"great", "lovely", "happy", "good"},
    }
    for text, label in zip(held.texts, held.labels, strict=True):
        assert set(text.split()[:-1]) <= words[held.label_names[label]]


def test_holdout_zero_leaves_the_partitions_unchanged(toy: DataConfig) -> None:
    source = load_source(toy)
    for k in range(SITES):
        site = load_site(replace(toy, holdout=0), k, SITES)
        today = load_partition(source, k, SITES, scheme="iid", alpha=0.5, seed=3, test_fraction=0.2)
        for split, expected in ((site.train, today.train), (site.test, today.test)):
            assert split.texts == expected.texts
            assert np.array_equal(split.labels, expected.labels)
    assert len(load_holdout(toy)) == 0


def test_the_holdout_depends_only_on_the_seed(toy: DataConfig) -> None:
    config = replace(toy, holdout=50)
    held = load_holdout(config).texts
    assert held == load_holdout(config).texts
    assert held == load_holdout(replace(config, partitioner="dirichlet", alpha=0.3, test_fraction=0.5)).texts
    assert _site_texts(config) == _site_texts(config)
    assert held != load_holdout(replace(config, seed=4)).texts


def test_the_holdout_is_drawn_apart_from_the_partitioner(toy: DataConfig) -> None:
    """Not the rows that the IID partitioner's permutation of the same seed gives the first site."""
    held = set(load_holdout(replace(toy, holdout=80)).texts)
    first_site = set(load_site(replace(toy, holdout=0, test_fraction=0.0), 0, SITES).train.texts)
    assert held != first_site


@pytest.mark.parametrize("holdout", [-1, 240, 1000])
def test_a_holdout_that_leaves_no_rows_is_refused(toy: DataConfig, holdout: int) -> None:
    config = replace(toy, holdout=holdout)
    with pytest.raises(DataError, match=r"holdout must lie in \[0, 240\)"):
        load_holdout(config)
    with pytest.raises(DataError, match="holdout"):
        load_site(config, 0, SITES)


def test_holdout_rows_flag_reaches_the_config_and_the_spawned_trainers() -> None:
    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    assert data_config(parser.parse_args([])).holdout == 0
    args = parser.parse_args(["--holdout-rows", "2000"])
    assert data_config(args).holdout == 2000
    flags = model_and_data_flags(args)
    assert flags[flags.index("--holdout-rows") + 1] == "2000"
    assert data_config(parser.parse_args(flags)).holdout == 2000
