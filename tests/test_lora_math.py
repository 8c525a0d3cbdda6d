"""LoRA factor algebra: the error of averaging factors, the exact product mean, and truncated-SVD factors."""

from __future__ import annotations

from math import sqrt

import numpy as np
import pytest

from coordinator.lora_math import (
    factorize,
    lora_modules,
    mean_of_others,
    naive_averaging_error,
    product_mean,
)

Q = "base_model.model.bert.encoder.layer.0.attention.self.query"
V = "base_model.model.bert.encoder.layer.0.attention.self.value"
HEAD = "base_model.model.classifier.modules_to_save.dense.weight"


def site(rng: np.random.Generator, rank: int, out: int = 3, inner: int = 4) -> dict[str, np.ndarray]:
    return {
        f"{Q}.lora_A.weight": rng.standard_normal((rank, inner)).astype(np.float32),
        f"{Q}.lora_B.weight": rng.standard_normal((out, rank)).astype(np.float32),
        f"{V}.lora_A.weight": rng.standard_normal((rank, inner)).astype(np.float32),
        f"{V}.lora_B.weight": rng.standard_normal((out, rank)).astype(np.float32),
        HEAD: rng.standard_normal((2, inner)).astype(np.float32),
    }


def naive_matmul(b: np.ndarray, a: np.ndarray) -> list[list[float]]:
    return [
        [sum(float(b[i, k]) * float(a[k, j]) for k in range(b.shape[1])) for j in range(a.shape[1])]
        for i in range(b.shape[0])
    ]


def test_lora_modules_pairs_factors_in_key_order() -> None:
    keys = [
        f"{V}.lora_B.weight",
        HEAD,
        f"{Q}.lora_A.weight",
        f"{V}.lora_A.weight",
        f"{Q}.lora_B.weight",
        "base_model.model.bert.encoder.layer.0.output.dense.lora_A.weight",  # no B: not a module
    ]
    assert lora_modules(keys) == [
        (V, f"{V}.lora_A.weight", f"{V}.lora_B.weight"),
        (Q, f"{Q}.lora_A.weight", f"{Q}.lora_B.weight"),
    ]
    assert lora_modules([HEAD]) == []


def test_naive_error_by_hand_on_scalars() -> None:
    one = {"m.lora_A.weight": np.array([[2.0]]), "m.lora_B.weight": np.array([[1.0]])}
    two = {"m.lora_A.weight": np.array([[0.0]]), "m.lora_B.weight": np.array([[3.0]])}
    # equal weights: mean(BA) = (2 + 0)/2 = 1, mean(B)·mean(A) = 2·1 = 2 → |1 − 2| / 1
    assert naive_averaging_error([one, two], [1.0, 1.0]) == pytest.approx(1.0)
    # weights 1:3: mean(BA) = 0.5, mean(B)·mean(A) = 2.5·0.5 = 1.25 → 0.75 / 0.5
    assert naive_averaging_error([one, two], [1.0, 3.0]) == pytest.approx(1.5)


def test_naive_error_is_zero_for_identical_sites_and_for_a_shared_a() -> None:
    rng = np.random.default_rng(0)
    first = site(rng, 2)
    assert naive_averaging_error([first, dict(first)], [3.0, 5.0]) == pytest.approx(0.0, abs=1e-12)
    shared_a = {k: (v if "lora_A" in k else rng.standard_normal(v.shape)) for k, v in first.items()}
    assert naive_averaging_error([first, shared_a], [1.0, 2.0]) == pytest.approx(0.0, abs=1e-12)
    assert naive_averaging_error([{HEAD: np.ones(2)}], [1.0]) == 0.0
    zeros = {k: np.zeros_like(v) for k, v in first.items()}
    assert naive_averaging_error([zeros, zeros], [1.0, 1.0]) == 0.0


def test_naive_error_of_two_random_sites_matches_a_naive_loop() -> None:
    rng = np.random.default_rng(1)
    sites, weights = [site(rng, 2), site(rng, 2)], [1.0, 4.0]
    error = total = 0.0
    for module in (Q, V):
        a = [s[f"{module}.lora_A.weight"].astype(np.float64) for s in sites]
        b = [s[f"{module}.lora_B.weight"].astype(np.float64) for s in sites]
        exact = (np.array(naive_matmul(b[0], a[0])) * 1 + np.array(naive_matmul(b[1], a[1])) * 4) / 5
        naive = np.array(naive_matmul((b[0] + 4 * b[1]) / 5, (a[0] + 4 * a[1]) / 5))
        error += float(((exact - naive) ** 2).sum())
        total += float((exact**2).sum())
    result = naive_averaging_error(sites, weights)
    assert result > 0.1
    assert result == pytest.approx(sqrt(error / total), rel=1e-9)


def test_naive_error_refuses_mixed_ranks() -> None:
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="different ranks"):
        naive_averaging_error([site(rng, 2), site(rng, 4)], [1.0, 1.0])


def test_product_mean_matches_a_naive_loop_across_ranks() -> None:
    rng = np.random.default_rng(3)
    sites, weights, scales = [site(rng, 2), site(rng, 4)], [10.0, 30.0], [16 / 2, 16 / 4]  # lora_alpha 16
    out = product_mean(sites, weights, scales)
    assert sorted(out) == sorted([Q, V])
    for module in (Q, V):
        expected = np.zeros((3, 4))
        for s, w, scale in zip(sites, weights, scales):
            product = naive_matmul(s[f"{module}.lora_B.weight"], s[f"{module}.lora_A.weight"])
            expected += w * scale * np.array(product) / sum(weights)
        assert out[module].dtype == np.float32 and out[module].shape == (3, 4)
        np.testing.assert_allclose(out[module], expected, rtol=1e-6, atol=1e-6)


def test_product_mean_by_hand() -> None:
    one = {"m.lora_A.weight": np.array([[1.0, 2.0]]), "m.lora_B.weight": np.array([[1.0], [0.0]])}
    two = {"m.lora_A.weight": np.array([[0.0, 1.0], [1.0, 0.0]]), "m.lora_B.weight": np.eye(2)}
    # one: 2·[[1, 2], [0, 0]];  two (rank 2): 1·[[0, 1], [1, 0]];  weights 1:1
    out = product_mean([one, two], [1.0, 1.0], [2.0, 1.0])
    np.testing.assert_array_equal(out["m"], [[1.0, 2.5], [0.5, 0.0]])


def test_weights_and_scales_must_match_the_sites() -> None:
    one = {"m.lora_A.weight": np.ones((1, 2)), "m.lora_B.weight": np.ones((2, 1))}
    with pytest.raises(ValueError, match="expected 2 weights"):
        product_mean([one, one], [1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="expected 2 scales"):
        product_mean([one, one], [1.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="not all zero"):
        mean_of_others([one], [0.0], set())


def test_factorize_by_hand_on_a_diagonal() -> None:
    # σ = 3, 2, 1; rank 2 keeps 3 and 2, and the discarded 1 is the whole error
    delta = np.diag([-3.0, 2.0, 1.0])
    b, a = factorize(delta, 2, scale=2.0)
    r = sqrt(1.5)  # sqrt(3 / 2)
    np.testing.assert_allclose(b, [[r, 0], [0, 1], [0, 0]], atol=1e-7)
    np.testing.assert_allclose(a, [[-r, 0, 0], [0, 1, 0]], atol=1e-7)
    assert np.linalg.norm(delta - 2.0 * b.astype(np.float64) @ a) == pytest.approx(1.0, rel=1e-6)


def test_factorize_reproduces_a_delta_of_rank_at_most_r() -> None:
    rng = np.random.default_rng(4)
    delta = rng.standard_normal((6, 2)) @ rng.standard_normal((2, 5))  # rank 2
    for rank in (2, 3):
        b, a = factorize(delta, rank, scale=0.5)
        assert b.shape == (6, rank) and a.shape == (rank, 5) and b.dtype == a.dtype == np.float32
        np.testing.assert_allclose(0.5 * b.astype(np.float64) @ a, delta, atol=1e-5)


def test_factorize_error_is_the_norm_of_the_discarded_singular_values() -> None:
    rng = np.random.default_rng(5)
    delta = rng.standard_normal((8, 6))
    singular = np.linalg.svd(delta, compute_uv=False)
    for rank in (1, 3, 5):
        b, a = factorize(delta, rank, scale=4.0)
        residual = np.linalg.norm(delta - 4.0 * b.astype(np.float64) @ a)
        assert residual == pytest.approx(sqrt(float(np.sum(singular[rank:] ** 2))), rel=1e-5)


def test_factorize_pads_with_zeros_beyond_the_smaller_dimension() -> None:
    delta = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 7.0]])
    b, a = factorize(delta, 4, scale=1.0)
    assert b.shape == (3, 4) and a.shape == (4, 2)
    np.testing.assert_array_equal(b[:, 2:], 0.0)
    np.testing.assert_array_equal(a[2:], 0.0)
    np.testing.assert_allclose(b.astype(np.float64) @ a, delta, atol=1e-5)


def test_factorize_is_deterministic_and_signs_are_fixed() -> None:
    rng = np.random.default_rng(6)
    delta = rng.standard_normal((20, 30)).astype(np.float32)
    first, second = factorize(delta, 4, 2.0), factorize(delta.copy(), 4, 2.0)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(first, second))
    b, _ = first
    assert (b[np.argmax(np.abs(b), axis=0), np.arange(4)] > 0).all()
    flipped, _ = factorize(-delta, 4, 2.0)  # -delta has the same U up to sign: same B
    np.testing.assert_allclose(flipped, b, atol=1e-5)


def test_factorize_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank must be >= 1"):
        factorize(np.eye(2), 0, 1.0)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        factorize(np.eye(2), 1, 0.0)
    with pytest.raises(ValueError, match="must be a matrix"):
        factorize(np.ones(3), 1, 1.0)


def test_mean_of_others_averages_what_is_not_skipped() -> None:
    one = {"m.lora_A.weight": np.ones((1, 2)), "m.lora_B.weight": np.ones((2, 1)), HEAD: np.array([1.0, 2.0])}
    two = {"m.lora_A.weight": np.ones((2, 2)), "m.lora_B.weight": np.ones((2, 2)), HEAD: np.array([3.0, 6.0])}
    out = mean_of_others([one, two], [1.0, 3.0], {"m.lora_A.weight", "m.lora_B.weight"})
    assert list(out) == [HEAD]
    np.testing.assert_array_equal(out[HEAD], [2.5, 5.0])  # (1·[1, 2] + 3·[3, 6]) / 4
    assert out[HEAD].dtype == np.float32
