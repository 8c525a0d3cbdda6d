"""A site's data mapped onto the run's label set."""

from __future__ import annotations

import numpy as np
import pytest

from phalanx.data import DataError, TextDataset
from phalanx.sites import relabel


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
