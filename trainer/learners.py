"""Which learner serves a call: the site's own, or, under a coordinator serving many runs, one per run model.

A run names its model in every call (a `RunSpec`). The site serves it only with a backbone it
holds (`--models`, by default its `--model`) and only for its own label set; LoRA settings and
lengths are bounded before anything is built. Learners are built on first use, in a worker
thread, and the `capacity` most recently used are kept.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import replace

from phalanx.identity import printable
from phalanx.model import ModelConfig, ModelError
from phalanx.v1 import trainer_pb2
from trainer.jobs import LocalWork

DEFAULT_CAPACITY = 2
MAX_MODEL_CHARS = 256
MAX_LORA_R = 256
MAX_LORA_ALPHA = 4096
MAX_TARGET_MODULES = 16
MAX_LENGTH = 512
_MODULE_NAME = re.compile(r"[A-Za-z0-9_.]{1,64}")


class Unservable(Exception):
    """This site cannot serve the run: a model it does not hold, other labels, or settings out of bounds."""


class Learners:
    def __init__(
        self,
        own: LocalWork,
        own_config: ModelConfig,
        label_names: tuple[str, ...],
        *,
        models: Iterable[str] = (),
        build: Callable[[ModelConfig], LocalWork] | None = None,
        capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        """`own`: the learner the site started with (for `own_config`); `build` makes one for another
        config of a backbone in `models` (which always holds `own_config.model`); None serves only `own`."""
        self.own = own
        self._own_config = own_config
        self._labels = label_names
        self._models = frozenset([own_config.model, *models])
        self._build = build
        self._capacity = max(1, capacity)
        self._cache: OrderedDict[ModelConfig, LocalWork] = OrderedDict({own_config: own})
        self._lock = threading.Lock()

    def config_for(self, spec: trainer_pb2.RunSpec) -> ModelConfig:
        """The model config that serves `spec`; raise Unservable if this site cannot serve it."""
        if tuple(spec.label_names) != self._labels:
            raise Unservable(
                f"label sets differ: the run has {printable(list(spec.label_names)[:20], 300)}, this site {list(self._labels)}"
            )
        if spec.model not in self._models:
            raise Unservable(
                f"this site does not serve model {printable(spec.model, MAX_MODEL_CHARS)} (it serves {sorted(self._models)})"
            )
        targets = tuple(spec.target_modules)
        problems = [
            (1 <= spec.lora_r <= MAX_LORA_R, f"LoRA rank {spec.lora_r} is outside 1-{MAX_LORA_R}"),
            (1 <= spec.lora_alpha <= MAX_LORA_ALPHA, f"LoRA alpha {spec.lora_alpha} is outside 1-{MAX_LORA_ALPHA}"),
            (math.isfinite(spec.lora_dropout) and 0 <= spec.lora_dropout < 1, f"LoRA dropout {spec.lora_dropout} is outside [0, 1)"),
            (8 <= spec.max_length <= MAX_LENGTH, f"max length {spec.max_length} is outside 8-{MAX_LENGTH}"),
            (
                1 <= len(targets) <= MAX_TARGET_MODULES and all(_MODULE_NAME.fullmatch(t) for t in targets),
                f"target modules must be 1-{MAX_TARGET_MODULES} names of [A-Za-z0-9_.], got {printable(targets[:4], 200)}",
            ),
        ]  # fmt: skip
        refused = [message for ok, message in problems if not ok]
        if refused:
            raise Unservable("; ".join(refused))
        config = replace(
            self._own_config,
            model=spec.model,
            lora_r=self._own_config.lora_r if spec.mixed_ranks else spec.lora_r,  # mixed ranks: the site's own
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.lora_dropout,
            target_modules=targets,
            max_length=spec.max_length,
        )
        if config != self._own_config and self._build is None:
            raise Unservable("this site serves only the model settings it was started with")
        return config

    def get(self, config: ModelConfig) -> LocalWork:
        """The learner for `config`, built if need be (seconds: call it in a worker thread)."""
        with self._lock:
            learner = self._cache.get(config)
            if learner is not None:
                self._cache.move_to_end(config)
                return learner
            assert self._build is not None  # config_for refuses other configs without a builder
            try:
                learner = self._build(config)
            except (ModelError, OSError, ValueError) as exc:
                raise Unservable(f"cannot load model {printable(config.model, MAX_MODEL_CHARS)}: {printable(exc, 300)}") from exc
            self._cache[config] = learner
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
            return learner

    def cached(self) -> list[ModelConfig]:
        with self._lock:
            return list(self._cache)
