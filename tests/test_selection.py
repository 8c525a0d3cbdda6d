"""Client selection: uniform, resource-aware and performance-aware choices, and the tracker behind them."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from coordinator.selection import (
    Candidate,
    PerformanceTracker,
    SelectionConfig,
    SiteCapabilities,
    select,
    update_alignment,
)

GB = 10**9


def sites(count: int) -> list[Candidate]:
    return [Candidate(f"site-{i:02d}", SiteCapabilities(cores=8, memory_bytes=16 * GB)) for i in range(count)]


def history(names: list[str], fast: str, rounds: int = 3) -> PerformanceTracker:
    """Every site slow and barely helpful, but `fast`: quick and aligned with the aggregate."""
    tracker = PerformanceTracker()
    for _ in range(rounds):
        for name in names:
            if name == fast:
                tracker.record(name, 5.0, 0.9)
            else:
                tracker.record(name, 20.0, 0.1)
    return tracker


@pytest.mark.parametrize("seed", range(20))
def test_uniform_draws_what_the_plain_sample_draws(seed: int) -> None:
    candidates = sites(10)
    expected = sorted(random.Random(seed).sample(candidates, 4), key=lambda c: c.name)
    selection = select(candidates, 4, SelectionConfig(), random.Random(seed))
    assert selection.chosen == [c.name for c in expected]
    assert selection.reasons == {c.name: "uniform draw" for c in expected}
    assert selection.skipped == {}


def test_uniform_takes_everyone_when_k_exceeds_the_candidates() -> None:
    selection = select(sites(3), 5, SelectionConfig(), random.Random(0))
    assert selection.chosen == ["site-00", "site-01", "site-02"]


def test_resource_skips_sites_below_the_thresholds_and_says_why() -> None:
    candidates = [
        Candidate("big", SiteCapabilities(cores=16, memory_bytes=64 * GB, accelerator="cuda:NVIDIA H200")),
        Candidate("few-cores", SiteCapabilities(cores=2, memory_bytes=64 * GB)),
        Candidate("small-memory", SiteCapabilities(cores=16, memory_bytes=4 * GB)),
        Candidate("silent", SiteCapabilities()),
        Candidate("medium", SiteCapabilities(cores=4, memory_bytes=8 * GB)),
    ]
    config = SelectionConfig(policy="resource", min_cores=4, min_memory_gb=8)
    for seed in range(50):
        selection = select(candidates, 5, config, random.Random(seed))
        assert selection.chosen == ["big", "medium"]
        assert selection.reasons == {"big": "meets resources", "medium": "meets resources"}
    assert set(selection.skipped) == {"few-cores", "small-memory", "silent"}
    assert selection.skipped["few-cores"] == "2 cores < --selection-min-cores 4"
    assert selection.skipped["small-memory"] == "4 GB memory < --selection-min-memory-gb 8"
    assert "cores not reported" in selection.skipped["silent"]
    assert "memory not reported" in selection.skipped["silent"]


def test_resource_draws_uniformly_among_the_eligible() -> None:
    candidates = sites(6) + [Candidate("weak", SiteCapabilities(cores=1, memory_bytes=16 * GB))]
    config = SelectionConfig(policy="resource", min_cores=2)
    counts = dict.fromkeys((c.name for c in candidates), 0)
    for seed in range(300):
        for name in select(candidates, 2, config, random.Random(seed)).chosen:
            counts[name] += 1
    assert counts.pop("weak") == 0
    assert all(60 < count < 140 for count in counts.values()), counts


def test_to_row_is_json_ready() -> None:
    candidates = [Candidate("a", SiteCapabilities(cores=8)), Candidate("b", SiteCapabilities(cores=1))]
    row = select(candidates, 2, SelectionConfig(policy="resource", min_cores=4), random.Random(0)).to_row(
        "resource"
    )
    assert json.loads(json.dumps(row)) == {
        "policy": "resource",
        "chosen": ["a"],
        "skipped": [{"site": "b", "reason": "1 cores < --selection-min-cores 4"}],
        "reasons": {"a": "meets resources"},
    }


def test_performance_prefers_the_fast_helpful_site() -> None:
    candidates = sites(8)
    names = [c.name for c in candidates]
    tracker = history(names, fast="site-05")
    config = SelectionConfig(policy="performance", explore=0.1)
    for seed in range(50):
        selection = select(candidates, 3, config, random.Random(seed), tracker)
        assert "site-05" in selection.chosen
        assert selection.reasons["site-05"].startswith("top score (ema 5.0 s, alignment 0.90")
        assert sum(reason.startswith("exploration") for reason in selection.reasons.values()) == 1


def test_performance_still_explores_every_site() -> None:
    candidates = sites(8)
    tracker = history([c.name for c in candidates], fast="site-05")
    config = SelectionConfig(policy="performance", explore=0.1)
    seen = set()
    for seed in range(200):
        seen.update(select(candidates, 2, config, random.Random(seed), tracker).chosen)
    assert seen == {c.name for c in candidates}


def test_performance_measures_new_sites_first() -> None:
    candidates = sites(8)
    tracker = history([c.name for c in candidates[:7]], fast="site-05")
    for seed in range(20):
        selection = select(candidates, 3, SelectionConfig(policy="performance"), random.Random(seed), tracker)
        assert selection.reasons["site-07"] == "exploration (not measured yet)"


def test_performance_without_history_is_a_uniform_draw() -> None:
    candidates = sites(10)
    config = SelectionConfig(policy="performance")
    for seed in range(10):
        expected = sorted(c.name for c in random.Random(seed).sample(candidates, 4))
        for tracker in (None, PerformanceTracker()):
            selection = select(candidates, 4, config, random.Random(seed), tracker)
            assert selection.chosen == expected
            assert set(selection.reasons.values()) == {"no history yet: uniform draw"}


def test_performance_respects_resource_thresholds() -> None:
    candidates = sites(4) + [Candidate("weak", SiteCapabilities(cores=1, memory_bytes=16 * GB))]
    tracker = history([c.name for c in candidates], fast="weak")
    config = SelectionConfig(policy="performance", min_cores=4)
    for seed in range(50):
        selection = select(candidates, 2, config, random.Random(seed), tracker)
        assert "weak" not in selection.chosen and len(selection.chosen) == 2
        assert selection.skipped == {"weak": "1 cores < --selection-min-cores 4"}


def test_a_single_slot_explores_with_the_explore_probability() -> None:
    candidates = sites(5)
    tracker = history([c.name for c in candidates], fast="site-00")
    config = SelectionConfig(policy="performance", explore=0.25)
    chosen = [select(candidates, 1, config, random.Random(seed), tracker).chosen for seed in range(400)]
    explored = sum(c != ["site-00"] for c in chosen)
    assert 60 < explored < 140


def test_selection_is_deterministic() -> None:
    candidates = sites(12)
    tracker = history([c.name for c in candidates[:9]], fast="site-03")
    config = SelectionConfig(policy="performance", explore=0.3)
    first = select(candidates, 5, config, random.Random(7), tracker)
    assert select(candidates, 5, config, random.Random(7), tracker) == first


def test_tracker_moving_averages_after_two_records() -> None:
    tracker = PerformanceTracker(smoothing=0.5)
    tracker.record("a", 10.0, 0.8)
    tracker.record("a", 20.0, 0.4)
    assert tracker.seconds("a") == pytest.approx(15.0)
    assert tracker.alignment("a") == pytest.approx(0.6)
    tracker = PerformanceTracker(smoothing=0.25)
    tracker.record("a", 10.0, 0.8)
    tracker.record("a", 20.0, 0.4)
    # 10 + 0.25 * (20 - 10), 0.8 + 0.25 * (0.4 - 0.8)
    assert tracker.seconds("a") == pytest.approx(12.5)
    assert tracker.alignment("a") == pytest.approx(0.7)


def test_tracker_score_formula() -> None:
    tracker = PerformanceTracker()
    tracker.record("fast", 5.0, 1.0)
    tracker.record("median", 10.0, 0.0)
    tracker.record("slow", 20.0, -0.5)
    # (1 + alignment) / 2 * median seconds (10) / seconds
    assert tracker.score("fast") == pytest.approx(1.0 * 2.0)
    assert tracker.score("median") == pytest.approx(0.5 * 1.0)
    assert tracker.score("slow") == pytest.approx(0.25 * 0.5)
    assert tracker.score("never") is None
    assert tracker.describe("fast") == "ema 5.0 s, alignment 1.00, score 2.00 over 1 round"
    assert tracker.describe("never") == "not measured yet"


def test_tracker_ignores_unmeasurable_records() -> None:
    tracker = PerformanceTracker()
    tracker.record("a", 10.0, 0.5)
    tracker.record("a", 10.0, math.nan)
    tracker.record("a", math.inf, 0.5)
    tracker.record("b", 10.0, -math.inf)
    assert tracker.to_state() == {"a": {"seconds": 10.0, "alignment": 0.5, "rounds": 1}}


def test_tracker_state_round_trip_gives_the_same_choices() -> None:
    candidates = sites(10)
    tracker = history([c.name for c in candidates[:8]], fast="site-02")
    tracker.record("site-04", 3.0, 0.7)
    restored = PerformanceTracker.from_state(json.loads(json.dumps(tracker.to_state())))
    assert restored.to_state() == tracker.to_state()
    config = SelectionConfig(policy="performance", explore=0.3)
    for seed in range(20):
        assert select(candidates, 4, config, random.Random(seed), restored) == select(
            candidates, 4, config, random.Random(seed), tracker
        )


def test_tracker_refuses_a_malformed_state() -> None:
    with pytest.raises(ValueError, match="'a'"):
        PerformanceTracker.from_state({"a": {"seconds": 1.0}})
    with pytest.raises(ValueError, match="'b'"):
        PerformanceTracker.from_state({"b": {"seconds": 1.0, "alignment": 3.0, "rounds": 1}})


def test_update_alignment_hand_checked() -> None:
    update = {"a": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([[2.0]], dtype=np.float32)}
    assert update_alignment(update, {k: 3 * v for k, v in update.items()}) == pytest.approx(1.0)
    assert update_alignment(update, {k: -v for k, v in update.items()}) == pytest.approx(-1.0)
    orthogonal = {"a": np.array([2.0, -1.0]), "b": np.array([[0.0]])}
    assert update_alignment(update, orthogonal) == pytest.approx(0.0)
    zero = {k: np.zeros_like(v) for k, v in update.items()}
    assert update_alignment(update, zero) == 0.0
    assert update_alignment(zero, update) == 0.0
    # (1*1 + 0*1) / (1 * sqrt(2)), the keys taken together
    assert update_alignment(
        {"x": np.array([1.0]), "y": np.array([0.0])}, {"x": np.array([1.0]), "y": np.array([1.0])}
    ) == (pytest.approx(1 / math.sqrt(2)))


def test_update_alignment_refuses_mismatched_updates() -> None:
    with pytest.raises(ValueError, match="keys"):
        update_alignment({"a": np.ones(2)}, {"b": np.ones(2)})
    with pytest.raises(ValueError, match="shape"):
        update_alignment({"a": np.ones(2)}, {"a": np.ones(3)})


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"policy": "fastest"}, "--selection "),
        ({"policy": "resource", "min_cores": -1}, "--selection-min-cores"),
        ({"policy": "resource", "min_memory_gb": -0.5}, "--selection-min-memory-gb"),
        ({"policy": "resource", "min_memory_gb": math.nan}, "--selection-min-memory-gb"),
        ({"policy": "performance", "explore": 1.0}, "--selection-explore"),
        ({"policy": "performance", "explore": -0.1}, "--selection-explore"),
        ({"policy": "performance", "explore": math.nan}, "--selection-explore"),
        ({"min_cores": 4}, "--selection-min-cores"),
    ],
)
def test_invalid_configs_name_the_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        SelectionConfig(**kwargs)


def test_select_refuses_duplicate_names_and_negative_k() -> None:
    with pytest.raises(ValueError, match="site-00"):
        select(sites(2) + sites(1), 1, SelectionConfig(), random.Random(0))
    with pytest.raises(ValueError):
        select(sites(2), -1, SelectionConfig(), random.Random(0))
