"""Aggregation throughput against memcpy: `python -m bench.aggregation [--quick]` from the repository root.

Each row aggregates K replies of about P float32 parameters, in 26 tensors shaped like the default
adapter's, with `create_aggregator`: `add` every reply, then `result`. The replies lie in distinct
memory. GB/s counts K * P * 4 input bytes over the median seconds; memcpy is `np.copyto` of those
same bytes, timed in the same run; ratio is the first over the second. The target is FedAvg at
K=100, P=1.2M running at half of memcpy or better. Median and trimmed mean hold and stack every
reply, so they run at smaller sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from bench.common import (
    DEFAULT_PARAMS,
    adapter_shapes,
    header,
    make_adapters,
    median_seconds,
    memcpy_gbps,
    quick_and_repeats,
)
from coordinator.aggregation import create_aggregator

FEDAVG = [("fedavg", k) for k in (2, 10, 100)]
ROBUST = [("median", 10), ("trimmed-mean", 10)]
FULL = {  # parameters -> (strategy, replies)
    DEFAULT_PARAMS: FEDAVG + ROBUST + [("median", 100), ("trimmed-mean", 100)],
    1_200_000: FEDAVG + ROBUST,
    12_000_000: FEDAVG,
}
QUICK = {DEFAULT_PARAMS: FEDAVG + ROBUST, 1_200_000: FEDAVG[1:]}
TARGET = ("fedavg", 100, 1_200_000, 0.5)


def aggregate(strategy: str, replies: list[Mapping[str, np.ndarray]]) -> None:
    aggregator = create_aggregator(strategy, replies[0])
    for k, reply in enumerate(replies):
        aggregator.add(reply, weight=100.0 + k)
    aggregator.result()


def main(argv: list[str] | None = None) -> None:
    quick, repeats = quick_and_repeats(
        __doc__.splitlines()[0], "up to 1.2M parameters, fewer rows and repeats", argv
    )
    rng = np.random.default_rng(0)

    print(header("coordinator.aggregation: seconds per round and GB/s of replies against memcpy"))
    print(f"{'strategy':<13} {'K':>4} {'P':>11} {'seconds':>10} {'GB/s':>7} {'memcpy GB/s':>12} {'ratio':>6}")
    ratios = {}
    for params, cases in (QUICK if quick else FULL).items():
        shapes = adapter_shapes(params)
        size = sum(math.prod(s) for s in shapes.values())
        replies, store = make_adapters(shapes, max(k for _, k in cases), rng)
        for strategy, k in cases:
            seconds = median_seconds(lambda: aggregate(strategy, replies[:k]), repeats, min_seconds=0.2)
            copy = memcpy_gbps(store[: k * size], repeats)
            rate = k * size * 4 / seconds / 1e9
            ratios[strategy, k, params] = rate / copy
            cells = f"{seconds:>10.5f} {rate:>7.2f} {copy:>12.2f} {rate / copy:>6.2f}"
            print(f"{strategy:<13} {k:>4} {size:>11,} {cells}", flush=True)
        del replies, store
    strategy, k, params, goal = TARGET
    if (strategy, k, params) in ratios:
        ratio = ratios[strategy, k, params]
        verdict = "met" if ratio >= goal else "missed"
        print(f"# target {strategy} K={k} P={params:,}: {goal:.0%} of memcpy: {verdict} ({ratio:.0%})")


if __name__ == "__main__":
    main()
