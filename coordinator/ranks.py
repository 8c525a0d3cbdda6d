"""LoRA ranks in adapter layouts: a site's rank, and the run's layout at another rank (runs with mixed ranks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from phalanx.codec import AdapterError, TensorLayout
from phalanx.model import is_lora_a

MAX_RANK = 256


def is_lora_b(name: str) -> bool:
    return ".lora_B." in name


def lora_rank(layout: Sequence[TensorLayout]) -> int:
    """The rank of the LoRA factors in `layout` (0 if it has none); AdapterError if they disagree or are out of bounds."""
    ranks = {t.shape[0] for t in layout if is_lora_a(t.name) and len(t.shape) == 2}
    ranks |= {t.shape[1] for t in layout if is_lora_b(t.name) and len(t.shape) == 2}
    if not ranks:
        return 0
    if len(ranks) > 1:
        raise AdapterError(f"LoRA factors of several ranks: {sorted(ranks)[:4]}")
    rank = ranks.pop()
    if not 1 <= rank <= MAX_RANK:
        raise AdapterError(f"LoRA rank {rank} is outside 1-{MAX_RANK}")
    return rank


def with_rank(layout: Sequence[TensorLayout], rank: int) -> tuple[TensorLayout, ...]:
    """`layout` with every LoRA factor at `rank`: lora_A (rank, in), lora_B (out, rank)."""
    return tuple(
        replace(t, shape=(rank, t.shape[1])) if is_lora_a(t.name) and len(t.shape) == 2
        else replace(t, shape=(t.shape[0], rank)) if is_lora_b(t.name) and len(t.shape) == 2
        else t
        for t in layout
    )  # fmt: skip
