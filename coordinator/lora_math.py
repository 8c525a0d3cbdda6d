"""LoRA factor algebra: averaging updates ΔW = s·B@A rather than their factors.

A PEFT adapter holds, per adapted module, `<module>.lora_A.weight` (r × in) and
`<module>.lora_B.weight` (out × r); the module's update is ΔW = s·B@A with s = lora_alpha / r.
Averaging A and B separately does not average the updates: mean(B)·mean(A) ≠ mean(B@A) unless the
sites agree on A (FFA-LoRA freezes A, so averaging B alone is exact) or on B.
`naive_averaging_error` measures the gap.

FlexLoRA (Bai et al. 2024, "Federated Fine-tuning of Large Language Models under Heterogeneous
Tasks and Client Resources") averages the products instead: `product_mean` is the exact weighted
mean of the sites' updates, and it is defined whatever rank each site trains at. `factorize` then
hands a site its share at its own rank r by truncated SVD, which by Eckart–Young is the best
rank-r approximation of the mean in Frobenius norm. Sites still send and receive ordinary
lora_A/lora_B tensors of their configured rank, so the wire format is unchanged and every adapter
the server writes loads as a standard PEFT adapter; only the server holds a full out × in update
per module, while it aggregates. Tensors outside the LoRA pairs (a classification head, say) are
plain weights and are averaged as they are (`mean_of_others`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence

import numpy as np

LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"


def lora_modules(keys: Iterable[str]) -> list[tuple[str, str, str]]:
    """(module prefix, A key, B key) for every module with both factors, in order of first appearance."""
    keys = list(keys)
    present = set(keys)
    prefixes = dict.fromkeys(
        key[: -len(end)] for key in keys for end in (LORA_A, LORA_B) if key.endswith(end)
    )
    return [(p, p + LORA_A, p + LORA_B) for p in prefixes if p + LORA_A in present and p + LORA_B in present]


def naive_averaging_error(adapters: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> float:
    """Relative Frobenius error of averaging the factors separately, over all LoRA modules together:

    sqrt(Σ ‖mean(B_i@A_i) − mean(B_i)@mean(A_i)‖²) / sqrt(Σ ‖mean(B_i@A_i)‖²), means weighted by
    `weights`; 0.0 without LoRA modules or when every mean update is zero. Sites must share ranks.
    """
    w = _normalised(weights, len(adapters))
    error = total = 0.0
    for prefix, a_key, b_key in lora_modules(adapters[0]):
        if len({np.shape(adapter[a_key]) for adapter in adapters}) > 1:
            raise ValueError(f"sites train {prefix!r} at different ranks; its factors cannot be averaged")
        exact = _weighted_product(adapters, w, a_key, b_key)
        naive = _weighted_mean(adapters, w, b_key) @ _weighted_mean(adapters, w, a_key)
        error += float(np.sum(np.square(exact - naive)))
        total += float(np.sum(np.square(exact)))
    return math.sqrt(error / total) if total > 0 else 0.0


def product_mean(
    adapters: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], scales: Sequence[float]
) -> dict[str, np.ndarray]:
    """Per module prefix, Σ w_i·s_i·B_i@A_i / Σ w_i (float32); each site may have its own rank r_i."""
    coefficients = _normalised(weights, len(adapters)) * _values(scales, len(adapters), "scales")
    return {
        prefix: _weighted_product(adapters, coefficients, a_key, b_key).astype(np.float32)
        for prefix, a_key, b_key in lora_modules(adapters[0])
    }


def factorize(delta: np.ndarray, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(B, A), float32, shapes (out, rank) and (rank, in): scale·B@A is the best rank-`rank` fit of `delta`.

    Truncated SVD with the singular values split evenly between the factors; each column of B has
    its largest-magnitude entry positive, so the result does not depend on the SVD's sign choices.
    Beyond min(out, in) the extra columns of B and rows of A are zero.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    delta = np.asarray(delta, dtype=np.float64)
    if delta.ndim != 2:
        raise ValueError(f"delta must be a matrix, got shape {delta.shape}")
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.size)
    u, s, vt = u[:, :k], s[:k], vt[:k]
    signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(k)])
    half = np.sqrt(s / scale) * signs  # the signs cancel in the product
    b = np.zeros((delta.shape[0], rank), dtype=np.float32)
    a = np.zeros((rank, delta.shape[1]), dtype=np.float32)
    b[:, :k] = u * half
    a[:k] = half[:, None] * vt
    return b, a


def mean_of_others(
    adapters: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], skip: Collection[str]
) -> dict[str, np.ndarray]:
    """The weighted mean (float32) of every key of the first adapter that is not in `skip`."""
    w = _normalised(weights, len(adapters))
    return {
        key: _weighted_mean(adapters, w, key).astype(np.float32) for key in adapters[0] if key not in skip
    }


def _values(values: Sequence[float], count: int, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (count,):
        raise ValueError(f"expected {count} {what}, one per adapter, got {array.size}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} must be finite")
    return array


def _normalised(weights: Sequence[float], count: int) -> np.ndarray:
    w = _values(weights, count, "weights")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be >= 0 and not all zero")
    return w / w.sum()


def _weighted_mean(adapters: Sequence[Mapping[str, np.ndarray]], w: np.ndarray, key: str) -> np.ndarray:
    return np.tensordot(
        w, np.stack([np.asarray(adapter[key], dtype=np.float64) for adapter in adapters]), axes=1
    )


def _weighted_product(
    adapters: Sequence[Mapping[str, np.ndarray]], coefficients: np.ndarray, a_key: str, b_key: str
) -> np.ndarray:
    """Σ c_i·B_i@A_i in float64 as one product [c_1·B_1 | c_2·B_2 | …] @ [A_1; A_2; …], whatever the ranks."""
    bs = [c * np.asarray(adapter[b_key], dtype=np.float64) for adapter, c in zip(adapters, coefficients)]
    a_stack = np.concatenate([np.asarray(adapter[a_key], dtype=np.float64) for adapter in adapters])
    return np.concatenate(bs, axis=1) @ a_stack
