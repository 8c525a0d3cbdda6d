"""FedAvg: the weighted mean over key-matched adapters, and refusal of mismatched replies."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregation import FedAvg, clip_update, create_aggregator
from phalanx.codec import AdapterError


def test_fedavg_equals_hand_computed_weighted_mean() -> None:
    a = {"w": np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32), "b": np.array([0.0], dtype=np.float32)}
    b = {"w": np.array([[5.0, 6.0], [7.0, 8.0]], dtype=np.float32), "b": np.array([4.0], dtype=np.float32)}
    agg = FedAvg(a)
    agg.add(a, 1.0)
    agg.add(b, 3.0)
    out = agg.result()
    # (1*a + 3*b) / 4
    np.testing.assert_array_equal(out["w"], np.array([[4.0, 5.0], [6.0, 7.0]], dtype=np.float32))
    np.testing.assert_array_equal(out["b"], np.array([3.0], dtype=np.float32))
    assert out["w"].dtype == np.float32 and agg.count == 2


def test_fedavg_matches_numpy_average_on_random_adapters() -> None:
    rng = np.random.default_rng(0)
    adapters = [{"x": rng.standard_normal((5, 7)), "y": rng.standard_normal(11)} for _ in range(6)]
    weights = rng.integers(1, 1000, size=6).astype(float)
    agg = FedAvg(adapters[0])
    for adapter, weight in zip(adapters, weights):
        agg.add(adapter, weight)
    out = agg.result()
    for key in ("x", "y"):
        expected = np.average(np.stack([a[key] for a in adapters]), axis=0, weights=weights)
        np.testing.assert_allclose(out[key], expected, rtol=1e-6)


def test_key_order_does_not_matter() -> None:
    a = {"p": np.ones(2), "q": np.zeros(3)}
    agg = FedAvg(a)
    agg.add({"q": np.full(3, 2.0), "p": np.full(2, 4.0)}, 1.0)
    agg.add(a, 1.0)
    np.testing.assert_array_equal(agg.result()["p"], [2.5, 2.5])


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ({"w": np.zeros(3)}, "missing keys 'b'"),
        ({"w": np.zeros(3), "b": np.zeros(1), "c": np.zeros(1)}, "unexpected keys 'c'"),
        ({"w": np.zeros(4), "b": np.zeros(1)}, r"'w' has shape \[4\]"),
    ],
)
def test_mismatched_reply_is_rejected_and_not_partially_averaged(reply, message) -> None:
    reference = {"w": np.ones(3), "b": np.ones(1)}
    agg = FedAvg(reference)
    agg.add(reference, 2.0)
    with pytest.raises(AdapterError, match=message):
        agg.add(reply, 5.0)
    assert agg.count == 1
    np.testing.assert_array_equal(agg.result()["w"], np.ones(3))


def test_non_positive_weight_and_empty_result_are_refused() -> None:
    agg = FedAvg({"w": np.ones(1)})
    with pytest.raises(AdapterError, match="weight must be positive"):
        agg.add({"w": np.ones(1)}, 0.0)
    with pytest.raises(ValueError, match="no replies"):
        agg.result()


def test_unknown_aggregator_is_named() -> None:
    with pytest.raises(ValueError, match="unknown aggregator 'mean'"):
        create_aggregator("mean", {"w": np.ones(1)})


def test_fedavg_of_two_replies_is_the_same_bits_in_either_order() -> None:
    rng = np.random.default_rng(3)
    a, b = ({"w": rng.standard_normal(1000).astype(np.float32)} for _ in range(2))
    first, second = FedAvg(a), FedAvg(a)
    first.add(a, 37.0)
    first.add(b, 91.0)
    second.add(b, 91.0)
    second.add(a, 37.0)
    assert first.result()["w"].tobytes() == second.result()["w"].tobytes()


def test_median_and_trimmed_mean_ignore_one_outlier_per_coordinate() -> None:
    honest = [{"w": np.array([1.0, 2.0, 3.0], dtype=np.float32)} for _ in range(4)]
    honest[1]["w"] = np.array([1.1, 2.1, 3.1], dtype=np.float32)
    poisoned = {"w": np.array([1e9, -1e9, 1e9], dtype=np.float32)}
    median = create_aggregator("median", poisoned)
    trimmed = create_aggregator("trimmed-mean", poisoned, trim=0.2)  # 5 replies: drop 1 at each end
    for agg in (median, trimmed):
        for adapter in [*honest, poisoned]:
            agg.add(adapter, 1.0)
    np.testing.assert_array_equal(median.result()["w"], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(trimmed.result()["w"], [(1.0 + 1.0 + 1.1) / 3, 2.0, (3.0 + 3.0 + 3.1) / 3], rtol=1e-6)


def test_trimmed_mean_refuses_to_trim_half_or_more() -> None:
    with pytest.raises(ValueError, match=r"trim must be in \[0, 0.5\)"):
        create_aggregator("trimmed-mean", {"w": np.ones(1)}, trim=0.5)


def test_clip_update_bounds_the_distance_from_the_global_adapter() -> None:
    reference = {"a": np.zeros(3, dtype=np.float32), "b": np.ones(4, dtype=np.float32)}
    far = {"a": np.full(3, 1e6, dtype=np.float32), "b": np.ones(4, dtype=np.float32)}
    clipped, norm = clip_update(reference, far, max_norm=2.0)
    assert norm == pytest.approx(1e6 * np.sqrt(3))
    np.testing.assert_allclose(np.linalg.norm(clipped["a"]), 2.0, rtol=1e-6)
    np.testing.assert_array_equal(clipped["b"], reference["b"])
    near = {"a": np.full(3, 0.1, dtype=np.float32), "b": np.ones(4, dtype=np.float32)}
    unchanged, _ = clip_update(reference, near, max_norm=2.0)
    np.testing.assert_array_equal(unchanged["a"], near["a"])


def test_check_refuses_what_add_would_refuse_without_counting_it() -> None:
    agg = FedAvg({"w": np.ones(2)})
    with pytest.raises(AdapterError, match="weight must be positive and finite"):
        agg.check({"w": np.ones(2)}, float("nan"))
    with pytest.raises(AdapterError, match="missing keys"):
        agg.check({}, 1.0)
    assert agg.count == 0
