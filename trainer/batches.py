"""Tokenise a split once, then build dynamically padded batches from token id arrays."""

from __future__ import annotations

from collections.abc import Sequence
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

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Tensors for `indices`, padded to the longest example among them."""
        rows = [self.input_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(self.labels[np.asarray(indices)]),
        }
