"""Server optimisers: apply each round's aggregate to the global adapter as a pseudo-gradient step.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2. Per tensor, with
Δ = aggregate − current (the negative pseudo-gradient) and η the server learning rate:

- `fedavgm`:    m ← β·m + Δ;                       x ← x + η·m
- `fedadagrad`: m ← β1·m + (1−β1)·Δ;  v ← v + Δ²
- `fedadam`:    m ← β1·m + (1−β1)·Δ;  v ← β2·v + (1−β2)·Δ²
- `fedyogi`:    m ← β1·m + (1−β1)·Δ;  v ← v − (1−β2)·Δ²·sign(v − Δ²)

and for the three adaptive ones x ← x + η·m / (√v + τ). m starts at 0 and v at τ² (the paper
asks for v₋₁ ≥ τ²); there is no bias correction. `fedavgm` with β = 0 and η = 1 is plain FedAvg.

Everything is computed in float32 with numpy's elementwise operations, so the same inputs and
state give the same bits, and a run resumed from `state()` continues bit-identically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")


@dataclass(frozen=True)
class ServerOptimizerConfig:
    name: str = "none"
    lr: float = 0.0  # 0 means the optimiser's default: 1.0 for fedavgm, 0.01 for the adaptive ones
    momentum: float = 0.9  # fedavgm's beta
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3  # adaptivity (epsilon) of the adaptive ones

    @property
    def effective_lr(self) -> float:
        if self.lr > 0:
            return self.lr
        return 0.01 if self.name in ADAPTIVE else 1.0


def _check_config(config: ServerOptimizerConfig) -> None:
    if config.name not in SERVER_OPTIMIZERS:
        raise ValueError(
            f"unknown server optimiser {config.name!r}; choose from {', '.join(SERVER_OPTIMIZERS)}"
        )
    if not (config.lr >= 0 and math.isfinite(config.lr)):
        raise ValueError(f"server learning rate must be finite and >= 0, got {config.lr}")
    for field in ("momentum", "beta1", "beta2"):
        value = getattr(config, field)
        if not 0 <= value < 1:
            raise ValueError(f"server optimiser {field} must be in [0, 1), got {value}")
    if not (config.tau > 0 and math.isfinite(config.tau)):
        raise ValueError(f"server optimiser tau must be finite and > 0, got {config.tau}")


class ServerOptimizer:
    """Applies the round's pseudo-gradient to the global adapter."""

    def __init__(self, config: ServerOptimizerConfig, reference: Mapping[str, np.ndarray]) -> None:
        _check_config(config)
        if config.name == "none":
            raise ValueError("server optimiser 'none' takes the aggregate as is; there is nothing to step")
        self.config = config
        self.steps = 0
        self._adaptive = config.name in ADAPTIVE
        self._lr = np.float32(config.effective_lr)
        self._m = {name: np.zeros(np.shape(array), dtype=np.float32) for name, array in reference.items()}
        v0 = np.float32(config.tau) ** 2
        self._v = {name: np.full(m.shape, v0) for name, m in self._m.items()} if self._adaptive else {}

    def step(
        self, current: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The new global adapter (float32, the reference's keys and shapes); the inputs are not modified."""
        for what, adapter in (("current", current), ("aggregate", aggregate)):
            for name, m in self._m.items():
                if name not in adapter:
                    raise ValueError(f"{what} adapter lacks tensor {name!r}")
                if np.shape(adapter[name]) != m.shape:
                    raise ValueError(
                        f"{what} tensor {name!r} has shape {np.shape(adapter[name])}, expected {m.shape}"
                    )
        out: dict[str, np.ndarray] = {}
        for name in self._m:
            x = np.asarray(current[name], dtype=np.float32)
            delta = np.asarray(aggregate[name], dtype=np.float32) - x
            out[name] = x + self._lr * self._direction(name, delta)
        self.steps += 1
        return out

    def _direction(self, name: str, delta: np.ndarray) -> np.ndarray:
        """Update one tensor's moments from Δ; return the step before the learning rate."""
        c = self.config
        if not self._adaptive:
            self._m[name] = np.float32(c.momentum) * self._m[name] + delta
            return self._m[name]
        beta1, beta2, tau = np.float32(c.beta1), np.float32(c.beta2), np.float32(c.tau)
        one = np.float32(1)
        m = beta1 * self._m[name] + (one - beta1) * delta
        square = delta * delta
        v = self._v[name]
        if c.name == "fedadagrad":
            v = v + square
        elif c.name == "fedadam":
            v = beta2 * v + (one - beta2) * square
        else:  # fedyogi
            v = v - (one - beta2) * square * np.sign(v - square)
        self._m[name], self._v[name] = m, v
        return m / (np.sqrt(v) + tau)

    def state(self) -> dict[str, np.ndarray]:
        """Copies of everything needed to resume: "m/<key>", "v/<key>" (adaptive only) and "steps"."""
        state = {f"m/{name}": m.copy() for name, m in self._m.items()}
        state.update({f"v/{name}": v.copy() for name, v in self._v.items()})
        state["steps"] = np.array(self.steps, dtype=np.int64)
        return state

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Resume from `state()`'s output; ValueError on a missing, unexpected or misshapen entry."""
        expected = self.state()
        missing = [name for name in expected if name not in state]
        if missing:
            raise ValueError(f"{self.config.name} state lacks {', '.join(map(repr, missing))}")
        unexpected = [name for name in state if name not in expected]
        if unexpected:
            raise ValueError(
                f"{self.config.name} state has unexpected entries {', '.join(map(repr, unexpected))}"
            )
        for name, array in expected.items():
            if np.shape(state[name]) != array.shape:
                raise ValueError(
                    f"state entry {name!r} has shape {np.shape(state[name])}, expected {array.shape}"
                )
        steps = int(state["steps"])
        if steps < 0:
            raise ValueError(f"state entry 'steps' must be >= 0, got {steps}")
        self._m = {name: np.array(state[f"m/{name}"], dtype=np.float32) for name in self._m}
        self._v = {name: np.array(state[f"v/{name}"], dtype=np.float32) for name in self._v}
        self.steps = steps


def create_server_optimizer(
    config: ServerOptimizerConfig, reference: Mapping[str, np.ndarray]
) -> ServerOptimizer | None:
    """The configured optimiser, or None for "none" (the aggregate becomes the global adapter as is)."""
    _check_config(config)
    if config.name == "none":
        return None
    return ServerOptimizer(config, reference)
