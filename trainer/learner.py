"""Local training and evaluation: blocking torch code, run in a worker thread.

The learner never touches gRPC. It is given arrays and returns arrays; a `threading.Event`
checked before every step lets the event loop stop a job whose call was cancelled. The model
and batches live on the site's device (`Compute`); the adapter comes and goes as float32 numpy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from phalanx.model import ModelConfig, adapter_state, build_model, is_lora_a, load_adapter_state, load_tokenizer
from phalanx.partition import Partition
from trainer.batches import TokenizedSplit, batch_stream
from trainer.device import Compute
from trainer.jobs import EvalOutcome, StepCallback, Stopped, TrainOutcome


def proximal_term(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx (Li et al. 2020): mu/2 · ||w − w_global||² over the trained tensors; its gradient is mu · (w − w_global)."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))


class Learner:
    """One site's model and tokenised data. Not thread-safe: run one job at a time."""

    def __init__(self, model_config: ModelConfig, partition: Partition, compute: Compute | None = None) -> None:
        self.compute = compute or Compute(torch.device("cpu"), "fp32")
        tokenizer = load_tokenizer(model_config)
        self.model = build_model(model_config).to(self.compute.device)
        self.train_split = TokenizedSplit.from_texts(
            tokenizer, partition.train.texts, partition.train.labels, model_config.max_length
        )
        self.test_split = TokenizedSplit.from_texts(
            tokenizer, partition.test.texts, partition.test.labels, model_config.max_length
        )
        # A fixed shuffle of the test split, so "evaluate on at most N" takes a fair sample.
        self._test_order = np.random.default_rng(model_config.seed).permutation(len(self.test_split))
        self.layout_adapter = adapter_state(self.model)
        # The federated tensors (LoRA factors and the head): the parameters PEFT leaves trainable.
        self._federated = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def num_train_examples(self) -> int:
        return len(self.train_split)

    @property
    def num_test_examples(self) -> int:
        return len(self.test_split)

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
    ) -> TrainOutcome:
        if len(self.train_split) == 0:
            raise ValueError("this site has no training examples")
        started = time.perf_counter()
        load_adapter_state(self.model, adapter)
        torch.manual_seed(seed)
        batches = batch_stream(self.train_split.lengths(), batch_size, batch_order, seed)
        for name, p in self._federated:
            p.requires_grad_(not (freeze_lora_a and is_lora_a(name)))
        params = [p for _, p in self._federated if p.requires_grad]
        anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
        optimizer = torch.optim.AdamW(params, lr=learning_rate)
        scaler = self.compute.grad_scaler()
        self.model.train()
        losses: list[torch.Tensor] = []
        total = torch.zeros((), device=self.compute.device)
        seen = 0
        for _, indices in zip(range(steps), batches, strict=False):
            if stop.is_set():
                raise Stopped
            with self.compute.autocast():
                loss = self.model(**self.train_split.batch(indices, self.compute.device)).loss
            objective = loss + proximal_term(params, anchors, proximal_mu) if anchors else loss
            scaler.scale(objective).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
            seen += len(indices)
            if on_step is not None:
                total += losses[-1]  # on the device: no sync unless the reporter reads it
                on_step(len(losses), total / len(losses))
        return TrainOutcome(
            adapter=adapter_state(self.model),
            loss=float(torch.stack(losses).mean()) if losses else float("nan"),
            steps=len(losses),
            examples_seen=seen,
            seconds=time.perf_counter() - started,
        )

    def evaluate(
        self, adapter: Mapping[str, np.ndarray], *, batch_size: int, max_examples: int, stop: threading.Event
    ) -> EvalOutcome:
        started = time.perf_counter()
        load_adapter_state(self.model, adapter)
        chosen = self._test_order[:max_examples] if max_examples > 0 else self._test_order
        if len(chosen) == 0:
            raise ValueError("this site has no test examples")
        # Length-sorted batches waste the least compute on padding.
        chosen = chosen[np.argsort(self.test_split.lengths()[chosen], kind="stable")]
        self.model.eval()
        total_loss = 0.0
        correct = 0
        with torch.inference_mode():
            for start in range(0, len(chosen), batch_size):
                if stop.is_set():
                    raise Stopped
                batch = self.test_split.batch(chosen[start : start + batch_size], self.compute.device)
                with self.compute.autocast():
                    logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                logits = logits.float()
                total_loss += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
                correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
        return EvalOutcome(
            loss=total_loss / len(chosen),
            accuracy=correct / len(chosen),
            num_examples=len(chosen),
            seconds=time.perf_counter() - started,
        )
