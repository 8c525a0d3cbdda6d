"""What a trainer's servicer asks of the code that does the local work, free of torch imports.

`Learner` (trainer/learner.py) does real fine-tuning; `EchoLearner` (trainer/echo.py) hands the
adapter back unchanged, for load tests and benchmarks of the coordinator.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, SupportsFloat

import numpy as np


class Stopped(Exception):
    """The job was asked to stop before it finished."""


StepCallback = Callable[[int, SupportsFloat], None]
"""Told after each training step: the steps done, and the mean loss so far (converted only if used)."""


@dataclass(frozen=True)
class TrainOutcome:
    adapter: Mapping[str, np.ndarray]
    loss: float
    steps: int
    examples_seen: int
    seconds: float


@dataclass(frozen=True)
class EvalOutcome:
    loss: float
    accuracy: float
    num_examples: int
    seconds: float


class LocalWork(Protocol):
    """Blocking training and evaluation on one site's data; called from a worker thread.

    Both methods check `stop` at least once per step and raise Stopped when it is set. `train`
    adds FedProx's proximal term with `proximal_mu` > 0 and keeps every lora_A factor fixed with
    `freeze_lora_a` (FFA-LoRA), and tells `on_step` after every step.
    """

    @property
    def layout_adapter(self) -> Mapping[str, np.ndarray]:
        """An adapter with the keys, shapes and dtypes this site sends and accepts."""
        ...

    @property
    def num_train_examples(self) -> int: ...

    @property
    def num_test_examples(self) -> int: ...

    def train(
        self,
        adapter: Mapping[str, np.ndarray],
        *,
        steps: int,
        batch_size: int,
        learning_rate: float,
        seed: int,
        stop: threading.Event,
        batch_order: str = "grouped",
        proximal_mu: float = 0.0,
        freeze_lora_a: bool = False,
        on_step: StepCallback | None = None,
    ) -> TrainOutcome: ...

    def evaluate(
        self, adapter: Mapping[str, np.ndarray], *, batch_size: int, max_examples: int, stop: threading.Event
    ) -> EvalOutcome: ...
