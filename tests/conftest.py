"""Shared fixtures: a tiny BERT built from a config (fast), with the real packaged tokenizer."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT saved as a local model directory, with MiniLM's tokenizer files."""
    import torch
    from transformers import BertConfig, BertModel

    from phalanx.model import DEFAULT_MODEL, resolve_model_path

    directory = tmp_path_factory.mktemp("tiny-bert")
    source = Path(resolve_model_path(DEFAULT_MODEL))
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, directory / name)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128,
    )  # fmt: skip
    BertModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory):
    """One provisioned federation (CA, coordinator, site-a/b/c, echo-0..5) for the whole session."""
    from tests.certs import Pki

    return Pki.provision(tmp_path_factory.mktemp("pki"))


def toy_csv(path: Path) -> Path:
    """240 short texts in three classes, each told apart by its words: a tiny model learns it in a few steps."""
    words = {"negative": "awful terrible sad bad", "neutral": "table chair window door", "positive": "great lovely happy good"}
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(240):
            label = list(words)[i % 3]
            writer.writerow([" ".join(rng.choice(words[label].split(), size=5)) + f" {i}", label])
    return path


@pytest.fixture
def common_flags(tmp_path: Path, tiny_model_dir: Path) -> list[str]:
    """Model and data flags for real processes: the tiny BERT on the toy CSV."""
    return ["--model", str(tiny_model_dir), "--data", str(toy_csv(tmp_path / "toy.csv")), "--max-length", "16"]
