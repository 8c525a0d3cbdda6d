"""Seconds per local training step of the real trainer, alone and with trainers sharing the machine.

Each trainer is its own process (as with --spawn-trainers) holding the default backbone, LoRA
and a partition of the packaged tweets, tokenised once; it runs `Learner.train` (the code a
Train call runs: load the adapter, then fwd+bwd+AdamW per step on dynamically padded batches)
after one warm-up job. Compare torch threads per trainer against the cores they share.

    python -m bench.train_step [--steps 10] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import threading

from bench.common import header

CONFIGS = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)]
"""(trainers, torch threads each)."""


def trainer_job(partition: int, trainers: int, threads: int, steps: int, batch_size: int, start, results) -> None:
    os.environ.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    import torch

    torch.set_num_threads(threads)
    from phalanx.model import ModelConfig
    from phalanx.sites import DataConfig, load_site
    from trainer.learner import Learner

    learner = Learner(ModelConfig(num_labels=3), load_site(DataConfig(), partition, trainers))
    adapter = learner.layout_adapter
    stop = threading.Event()
    learner.train(adapter, steps=2, batch_size=batch_size, learning_rate=1e-3, seed=0, stop=stop)
    start.wait()  # every trainer starts timing together, so they really share the cores
    outcome = learner.train(adapter, steps=steps, batch_size=batch_size, learning_rate=1e-3, seed=1, stop=stop)
    results.put(outcome.seconds / outcome.steps)


def measure(trainers: int, threads: int, steps: int, batch_size: int) -> list[float]:
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(trainers), ctx.Queue()
    processes = [
        ctx.Process(target=trainer_job, args=(k, trainers, threads, steps, batch_size, start, results))
        for k in range(trainers)
    ]
    for p in processes:
        p.start()
    try:
        return [results.get(timeout=900) for _ in processes]
    finally:
        for p in processes:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per trainer")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    print(header("train step: default MiniLM + LoRA, packaged tweets, max length 64, dynamic padding"))
    print(f"{'trainers':>8} {'threads each':>12} {'s/step (mean)':>14} {'slowest':>8}")
    for trainers, threads in CONFIGS:
        seconds = measure(trainers, threads, args.steps, args.batch_size)
        print(f"{trainers:>8} {threads:>12} {statistics.mean(seconds):>14.3f} {max(seconds):>8.3f}", flush=True)


if __name__ == "__main__":
    main()
