"""Length-grouped batches: every example once an epoch, the same for the same seed, less padding."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from trainer.batches import POOL_BATCHES, batch_stream, grouped_epoch, random_epoch

# Tweet-like lengths: a bulk of 10-45 tokens and a long tail.
LENGTHS = np.random.default_rng(1).gamma(6.0, 5.0, size=2_345).astype(np.int64).clip(3, 64)


def padded_tokens(batches: list[np.ndarray]) -> int:
    return sum(int(LENGTHS[b].max()) * len(b) for b in batches)


@pytest.mark.parametrize("batch_size", [1, 7, 32, 5_000])
def test_a_grouped_epoch_holds_every_example_exactly_once(batch_size: int) -> None:
    batches = grouped_epoch(LENGTHS, batch_size, np.random.default_rng(0))
    together = np.concatenate(batches)
    assert np.array_equal(np.sort(together), np.arange(len(LENGTHS)))
    sizes = [len(b) for b in batches]
    assert max(sizes) == min(batch_size, len(LENGTHS))
    # Only each pool's last batch can be short, and pools are whole batches but the epoch's last.
    assert sum(size < batch_size for size in sizes) <= 1


def test_grouped_batches_hold_examples_of_like_length_in_shuffled_order() -> None:
    batches = grouped_epoch(LENGTHS, 32, np.random.default_rng(0))
    spread = np.mean([np.ptp(LENGTHS[b]) for b in batches])
    random_spread = np.mean([np.ptp(LENGTHS[b]) for b in random_epoch(len(LENGTHS), 32, np.random.default_rng(0))])
    assert spread < random_spread / 3
    assert padded_tokens(batches) < 0.8 * padded_tokens(random_epoch(len(LENGTHS), 32, np.random.default_rng(0)))
    # Batches are not served shortest first: their widths are shuffled across the epoch.
    widths = [int(LENGTHS[b].max()) for b in batches]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)
    assert len(batches) > POOL_BATCHES  # several pools, so the shuffle mixes them


@pytest.mark.parametrize("order", ["grouped", "random"])
def test_batches_are_the_same_for_the_same_seed_and_differ_for_another(order: str) -> None:
    def draw(seed: int) -> list[list[int]]:
        return [b.tolist() for b in itertools.islice(batch_stream(LENGTHS, 32, order, seed), 200)]

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_the_stream_runs_epoch_after_epoch_each_covering_every_example() -> None:
    per_epoch = len(grouped_epoch(LENGTHS, 32, np.random.default_rng(0)))
    drawn = list(itertools.islice(batch_stream(LENGTHS, 32, "grouped", 3), 2 * per_epoch))
    for epoch in (drawn[:per_epoch], drawn[per_epoch:]):
        assert np.array_equal(np.sort(np.concatenate(epoch)), np.arange(len(LENGTHS)))
    assert [b.tolist() for b in drawn[:per_epoch]] != [b.tolist() for b in drawn[per_epoch:]]


def test_random_batches_are_full_and_drawn_as_before() -> None:
    """The former sampler, kept as --batch-order random: a permutation cut into full batches."""
    batches = list(itertools.islice(batch_stream(LENGTHS, 32, "random", 9), 3))
    order = np.random.default_rng(9).permutation(len(LENGTHS))
    assert [b.tolist() for b in batches] == [order[i * 32 : (i + 1) * 32].tolist() for i in range(3)]
    assert len(random_epoch(10, 32, np.random.default_rng(0))) == 1  # fewer examples than a batch: one batch of all


def test_an_unknown_order_or_an_empty_split_is_refused() -> None:
    with pytest.raises(ValueError, match="grouped or random"):
        next(batch_stream(LENGTHS, 32, "sorted", 0))
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(batch_stream(np.zeros(0, dtype=np.int64), 32, "grouped", 0))
