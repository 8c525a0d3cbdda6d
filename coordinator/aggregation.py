"""Aggregation strategies over key-matched adapters, vectorised with numpy.

Every strategy checks a reply against the global adapter's layout before it touches a value: a
reply whose key set or shapes differ raises AdapterError and is never partially averaged.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from phalanx.codec import Adapter, AdapterError, TensorLayout, check_layout, layout_of

AGGREGATORS = ("fedavg",)


class FedAvg:
    """Weighted mean (weights: example counts), accumulated reply by reply.

    Memory stays at one float64 running sum per key however many replies arrive.
    """

    def __init__(self, reference: Mapping[str, np.ndarray]) -> None:
        self._layout: tuple[TensorLayout, ...] = layout_of(reference)
        self._sum = {name: np.zeros(array.shape, dtype=np.float64) for name, array in reference.items()}
        self._weight = 0.0
        self.count = 0

    def add(self, adapter: Mapping[str, np.ndarray], weight: float) -> None:
        if not weight > 0:
            raise AdapterError(f"weight must be positive, got {weight}")
        check_layout(layout_of(adapter), self._layout)
        for name, total in self._sum.items():
            total += weight * np.asarray(adapter[name], dtype=np.float64)
        self._weight += weight
        self.count += 1

    def result(self) -> Adapter:
        if self.count == 0:
            raise ValueError("no replies to aggregate")
        return {name: (total / self._weight).astype(np.float32) for name, total in self._sum.items()}


def create_aggregator(name: str, reference: Mapping[str, np.ndarray]) -> FedAvg:
    if name == "fedavg":
        return FedAvg(reference)
    raise ValueError(f"unknown aggregator {name!r}; choose from {', '.join(AGGREGATORS)}")
