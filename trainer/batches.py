"""Tokenise a split once, then build dynamically padded batches from token id arrays.

A batch is padded to its longest example, so batches of examples of like length waste the
least compute: `grouped_epoch` draws an epoch as the usual "group by length" sampler does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TokenizedSplit:
    """Token ids per example (truncated, unpadded) and their labels."""

    input_ids: tuple[np.ndarray, ...]
    labels: np.ndarray
    pad_token_id: int

    @classmethod
    def from_texts(cls, tokenizer, texts: Sequence[str], labels: np.ndarray, max_length: int) -> TokenizedSplit:
        encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
        ids = tuple(np.asarray(x, dtype=np.int64) for x in encoded["input_ids"])
        return cls(ids, np.asarray(labels, dtype=np.int64), int(tokenizer.pad_token_id or 0))

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    def batch(self, indices: Sequence[int], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Tensors for `indices`, padded to the longest example among them."""
        rows = [self.input_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
        tensors = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(self.labels[np.asarray(indices)]),
        }
        if device is None or device.type == "cpu":
            return tensors
        return {k: v.to(device, non_blocking=True) for k, v in tensors.items()}


POOL_BATCHES = 16
"""Batches per pool that `grouped_epoch` sorts by length: wider pools pad less and mix lengths less."""


def random_epoch(count: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A shuffle cut into full batches (the tail that does not fill one is left out; all in one if that is less)."""
    order = rng.permutation(count)
    if 0 < count < batch_size:
        return [order]
    return [order[i : i + batch_size] for i in range(0, count - batch_size + 1, batch_size)]


def grouped_epoch(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Every example once, in batches of like length: shuffle, sort pools of POOL_BATCHES batches by
    length, cut each pool into batches, then shuffle the batches. One batch, the last pool's last, may be short."""
    order = rng.permutation(len(lengths))
    pool = POOL_BATCHES * batch_size
    batches: list[np.ndarray] = []
    for start in range(0, len(order), pool):
        members = order[start : start + pool]
        members = members[np.argsort(lengths[members], kind="stable")]
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def batch_stream(lengths: np.ndarray, batch_size: int, order: str, seed: int) -> Iterator[np.ndarray]:
    """Endless batches, epoch after epoch, the same for the same seed."""
    if order not in ("grouped", "random"):
        raise ValueError(f"batch order must be grouped or random, not {order[:20]!r}")
    rng = np.random.default_rng(seed)
    while True:
        epoch = grouped_epoch(lengths, batch_size, rng) if order == "grouped" else random_epoch(len(lengths), batch_size, rng)
        if not epoch:
            raise ValueError(f"the split has {len(lengths)} examples, fewer than one batch of {batch_size}")
        yield from epoch
