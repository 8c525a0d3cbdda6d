"""A run's global adapter as its LoRA variant federates it, moved each round by its server optimiser.

- Standard: both LoRA factors and the head travel and are averaged (FedAvg of A and B apart,
  which is not the average of the products B·A: the run reports that error each round).
- FFA-LoRA (Sun et al. 2024): every lora_A is frozen at values derived from the run's seed
  (`phalanx.model.ffa_lora_a`, which the sites derive alike). Only lora_B and the head travel, so
  averaging them is exact (mean(B_i)·A = mean(B_i·A)) and half the LoRA bytes stay home.
- Mixed ranks (FlexLoRA, Bai et al. 2024): sites train at their own rank. The coordinator keeps
  each module's update ΔW = mean(s_i·B_i·A_i) exactly, as a dense matrix, and hands each site the
  best approximation of it at the site's rank (truncated SVD). Stacking the factors as FLoRA
  does would be exact too, but its rank grows by the sites' ranks every round, and it must be
  merged into the backbone to stay bounded, so neither the wire nor the saved adapter would stay
  a standard LoRA adapter. The saved adapter is ΔW at the run's own rank: exact when the run's
  --lora-r is at least the sum of the sites' ranks.

A checkpoint holds the adapter, the server optimiser's state (SERVER_STATE_PREFIX) and, for mixed
ranks, the dense updates (DELTA_PREFIX), so a resumed run goes on bit-identically.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from coordinator.config import RoundConfig
from coordinator.lora_math import factorize, lora_modules
from coordinator.server_optimizers import create_server_optimizer
from phalanx.codec import Adapter
from phalanx.model import ModelConfig, ffa_lora_a, without_lora_a

SERVER_STATE_PREFIX = "server_optimizer/"
DELTA_PREFIX = "lora_delta/"
_PREFIXES = (SERVER_STATE_PREFIX, DELTA_PREFIX)


def adapter_tensors(tensors: Mapping[str, np.ndarray]) -> Adapter:
    """The adapter among a checkpoint's tensors (less the optimiser's state and the dense updates)."""
    return {k: v for k, v in tensors.items() if not k.startswith(_PREFIXES)}


def _part(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


@dataclass(frozen=True)
class ProductMean:
    """A mixed-rank round's aggregate: per LoRA module the mean of s_i·B_i·A_i, and the mean of the other tensors."""

    deltas: dict[str, np.ndarray]
    others: dict[str, np.ndarray]


class GlobalAdapter:
    def __init__(self, initial: Mapping[str, np.ndarray], rounds: RoundConfig, model: ModelConfig) -> None:
        """`initial`: a fresh adapter, or a checkpoint's tensors."""
        adapter = adapter_tensors(initial)
        self.ffa = rounds.lora_variant == "ffa"
        self.mixed = rounds.mixed_ranks
        self._seed = rounds.seed
        self._alpha = model.lora_alpha
        self._rank = model.lora_r
        frozen = ffa_lora_a(adapter, rounds.seed) if self.ffa else {}
        self.adapter: Adapter = {k: frozen.get(k, v) for k, v in adapter.items()}
        self._modules = lora_modules(self.adapter)
        self.deltas: dict[str, np.ndarray] = {}
        if self.mixed:
            self.deltas = _part(initial, DELTA_PREFIX) or {
                prefix: self.scale(self._rank) * (self.adapter[b] @ self.adapter[a]) for prefix, a, b in self._modules
            }
        self.optimizer = create_server_optimizer(rounds.server_optimizer, self.federated())
        state = _part(initial, SERVER_STATE_PREFIX)
        if state:
            if self.optimizer is None:
                raise ValueError("the checkpoint holds a server optimiser's state, but the run has --server-optimizer none")
            self.optimizer.load_state(state)

    def scale(self, rank: int) -> float:
        """LoRA's scaling α/r at `rank`."""
        return self._alpha / rank

    def federated(self) -> Adapter:
        """The tensors that travel and are aggregated: all, or under FFA-LoRA all but lora_A."""
        return without_lora_a(self.adapter) if self.ffa else self.adapter

    def for_rank(self, rank: int) -> Adapter:
        """Mixed ranks: the adapter a site of `rank` trains from, ΔW at its rank with the other tensors.

        Directions ΔW lacks (all of them before the first round) get a fresh lora_A row, drawn
        from the run's seed, against a zero lora_B column: the product is unchanged and the
        direction can still learn."""
        adapter = dict(self.adapter)
        for prefix, a, b in self._modules:
            factor_b, factor_a = factorize(self.deltas[prefix], rank, self.scale(rank))
            dead = ~factor_b.any(axis=0)
            if dead.any():
                fresh = ffa_lora_a({a: factor_a}, self._seed)[a]
                factor_a = np.where(dead[:, None], fresh, factor_a).astype(np.float32)
            adapter[a], adapter[b] = factor_a, factor_b
        return adapter

    def step(self, aggregate: Mapping[str, np.ndarray] | ProductMean) -> None:
        """Take the round's aggregate of the federated tensors, through the server optimiser if there is one."""
        if isinstance(aggregate, ProductMean):
            self.deltas = aggregate.deltas
            self.adapter = {**self.for_rank(self._rank), **aggregate.others}
            return
        new = self.optimizer.step(self.federated(), aggregate) if self.optimizer is not None else aggregate
        self.adapter = {k: new.get(k, v) for k, v in self.adapter.items()}

    def checkpoint(self) -> dict[str, np.ndarray]:
        """The adapter, the server optimiser's state and the dense updates, as one set of named tensors."""
        state = self.optimizer.state() if self.optimizer is not None else {}
        return {
            **self.adapter,
            **{SERVER_STATE_PREFIX + k: v for k, v in state.items()},
            **{DELTA_PREFIX + k: v for k, v in self.deltas.items()},
        }
