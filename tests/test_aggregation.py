"""Aggregation strategies against hand-computed results, and refusal of mismatched replies."""

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


def naive_krum_scores(replies: list[dict[str, np.ndarray]], neighbours: int) -> list[float]:
    """Krum scores by a double loop over replies, flattened in key order, in float64."""
    flat = [np.concatenate([np.ravel(r[k]).astype(np.float64) for k in replies[0]]) for r in replies]
    scores = []
    for i, x in enumerate(flat):
        distances = sorted(float(np.sum((x - y) ** 2)) for j, y in enumerate(flat) if j != i)
        scores.append(sum(distances[:neighbours]))
    return scores


def replies_of(*rows: tuple[float, float, float]) -> list[dict[str, np.ndarray]]:
    return [{"w": np.array(r[:2], dtype=np.float32), "b": np.array(r[2:], dtype=np.float32)} for r in rows]


# Four honest replies around (0.5, 0.5, 0) and one outlier. n = 5, so f = 1 and each score sums the
# 2 nearest: 0.5 + 1 for the corners, 0.5 + 0.5 for the centre, 226 + 243 for the outlier.
CORNERS = replies_of((0, 0, 0), (1, 0, 0), (0, 1, 0), (0.5, 0.5, 0), (9, -9, 9))


def test_krum_picks_the_central_reply_by_hand_computed_scores() -> None:
    agg = create_aggregator("krum", CORNERS[0])
    for i, reply in enumerate(CORNERS):
        agg.add(reply, 1.0 + 100 * i)  # claimed weights are ignored
    out = agg.result()
    np.testing.assert_allclose(agg.scores, [1.5, 1.5, 1.5, 1.0, 469.0])
    np.testing.assert_allclose(agg.scores, naive_krum_scores(CORNERS, 2))
    assert agg.selected == [3]
    np.testing.assert_array_equal(out["w"], [0.5, 0.5])
    np.testing.assert_array_equal(out["b"], [0.0])
    assert out["w"].dtype == np.float32


def test_krum_outvotes_two_colluding_outliers() -> None:
    replies = replies_of((0, 0, 0), (1, 0, 0), (0.4, 0.6, 0), (50, 50, 50), (50, 50, 51))
    agg = create_aggregator("krum", replies[0])
    for reply in replies:
        agg.add(reply, 1.0)
    agg.result()
    # honest scores with 2 neighbours: 1 + 0.52, 1 + 0.72, 0.52 + 0.72; each outlier's 2nd neighbour is honest
    np.testing.assert_allclose(agg.scores[:3], [1.52, 1.72, 1.24], rtol=1e-6)
    np.testing.assert_allclose(agg.scores, naive_krum_scores(replies, 2), rtol=1e-6)
    assert agg.selected == [2]


def test_multi_krum_averages_the_lowest_scoring_replies() -> None:
    default = create_aggregator("multi-krum", CORNERS[0])  # keep n - f = 4
    two = create_aggregator("multi-krum", CORNERS[0], keep=2)  # the centre, then the first tied corner
    for agg in (default, two):
        for reply in CORNERS:
            agg.add(reply, 7.0)
    np.testing.assert_array_equal(default.result()["w"], [(0 + 1 + 0 + 0.5) / 4, (0 + 0 + 1 + 0.5) / 4])
    assert default.selected == [0, 1, 2, 3]
    np.testing.assert_array_equal(two.result()["w"], [0.25, 0.25])
    assert two.selected == [0, 3]


def test_krum_byzantine_sets_the_neighbour_count() -> None:
    agg = create_aggregator("krum", CORNERS[0], byzantine=0)  # 3 neighbours
    for reply in CORNERS:
        agg.add(reply, 1.0)
    agg.result()
    np.testing.assert_allclose(agg.scores, naive_krum_scores(CORNERS, 3))
    # r0: 0.5 + 1 + 1, r1 and r2: 0.5 + 1 + 2, r3: 3·0.5
    np.testing.assert_allclose(agg.scores[:4], [2.5, 3.5, 3.5, 1.5])
    assert agg.selected == [3]


@pytest.mark.parametrize("name", ["krum", "multi-krum"])
@pytest.mark.parametrize("bad", [1e30, float("nan"), float("inf")])
def test_a_gross_outlier_never_enters_the_result(name: str, bad: float) -> None:
    rng = np.random.default_rng(11)
    for position in range(7):
        honest = [{"w": (rng.standard_normal((4, 3)) * 0.01).astype(np.float32)} for _ in range(6)]
        replies = [*honest[:position], {"w": np.full((4, 3), bad, dtype=np.float32)}, *honest[position:]]
        agg = create_aggregator(name, replies[0])
        for reply in replies:
            agg.add(reply, 1.0)
        out = agg.result()
        assert position not in agg.selected
        assert np.isfinite(out["w"]).all() and np.abs(out["w"]).max() < 0.1


def test_krum_scores_stay_accurate_beside_a_huge_outlier() -> None:
    # Honest replies differ by ~1e-4 around a common offset of 1e3; a plain Gram matrix would lose
    # their distances to cancellation next to the 1e20 outlier.
    rng = np.random.default_rng(5)
    replies = [{"w": (1e3 + rng.standard_normal(50) * 1e-4)} for _ in range(6)]
    replies.append({"w": np.full(50, 1e20)})
    agg = create_aggregator("krum", replies[0])
    for reply in replies:
        agg.add(reply, 1.0)
    agg.result()
    expected = naive_krum_scores(replies, 7 - 2 - 2)
    np.testing.assert_allclose(agg.scores[:6], expected[:6], rtol=1e-6)
    assert agg.selected == [int(np.argmin(expected))]


def test_krum_with_three_or_fewer_replies() -> None:
    replies = [{"w": np.array([x], dtype=np.float32)} for x in (0.0, 1.0, 5.0)]
    krum, multi = create_aggregator("krum", replies[0]), create_aggregator("multi-krum", replies[0])
    for agg in (krum, multi):
        for reply in replies:
            agg.add(reply, 1.0)
    # n = 3: f = 0, 1 neighbour; scores 1, 1, 16 and the tie goes to the first reply
    np.testing.assert_array_equal(krum.result()["w"], [0.0])
    assert krum.scores == [1.0, 1.0, 16.0] and krum.selected == [0]
    np.testing.assert_array_equal(multi.result()["w"], [2.0])  # keep n - f = 3: the plain mean
    single = create_aggregator("multi-krum", replies[0])
    single.add(replies[2], 1.0)
    np.testing.assert_array_equal(single.result()["w"], [5.0])
    assert single.selected == [0] and single.scores == [0.0]


@pytest.mark.parametrize("name", ["krum", "multi-krum"])
def test_krum_refuses_a_mismatched_reply(name: str) -> None:
    reference = {"w": np.ones(3), "b": np.ones(1)}
    agg = create_aggregator(name, reference)
    agg.add(reference, 1.0)
    with pytest.raises(AdapterError, match=r"'w' has shape \[4\]"):
        agg.add({"w": np.zeros(4), "b": np.zeros(1)}, 1.0)
    with pytest.raises(AdapterError, match="missing keys 'b'"):
        agg.add({"w": np.zeros(3)}, 1.0)
    assert agg.count == 1


def test_krum_refuses_negative_byzantine_and_keeping_none() -> None:
    with pytest.raises(ValueError, match="byzantine must be >= 0"):
        create_aggregator("krum", {"w": np.ones(1)}, byzantine=-1)
    with pytest.raises(ValueError, match="keep must be >= 1"):
        create_aggregator("multi-krum", {"w": np.ones(1)}, keep=0)
