"""Seconds per local training step of the real trainer: precision × batch order, then trainers sharing the machine.

Each trainer is its own process (as with --spawn-trainers) holding the default backbone, LoRA
and a partition of the packaged tweets, tokenised once; it runs `Learner.train` (the code a
Train call runs: load the adapter, then fwd+bwd+AdamW per step on dynamically padded batches)
after one warm-up job.

Part 1, one trainer on one thread: float32 against bf16 autocast, batches drawn at random
against batches grouped by length. The four settings take turns for --repeats rounds in one
process, so the machine's drift falls on all alike; the median is printed with the batches'
padded width and the share of padding in them.

Part 2, trainers × torch threads each, sharing the cores, in the trainers' default settings:
how many sites, with how many threads, get the most steps out of the machine.

    python -m bench.train_step [--steps 10] [--batch-size 32] [--repeats 3] [--skip-sharing]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import statistics
import threading

from bench.common import header

SETTINGS = list(itertools.product(("fp32", "bf16"), ("random", "grouped")))
"""(precision, batch order) of part 1."""
SHARING = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)]
"""(trainers, torch threads each) of part 2."""


def _learner(partition: int, partitions: int, threads: int, precision: str = "auto"):
    os.environ.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    import torch

    torch.set_num_threads(threads)
    from phalanx.model import ModelConfig
    from phalanx.sites import DataConfig, load_site
    from trainer.device import Compute
    from trainer.learner import Learner

    return Learner(ModelConfig(num_labels=3), load_site(DataConfig(), partition, partitions), Compute.choose("cpu", precision))


def padding(learner, batch_size: int, order: str, seed: int, steps: int) -> tuple[float, float]:
    """Mean padded width of the batches a job draws, and the share of it that is padding."""
    from trainer.batches import batch_stream

    lengths = learner.train_split.lengths()
    batches = list(itertools.islice(batch_stream(lengths, batch_size, order, seed), steps))
    widths = [lengths[b].max() for b in batches]
    padded = sum(w * len(b) for w, b in zip(widths, batches, strict=True))
    return statistics.mean(widths), 1 - sum(lengths[b].sum() for b in batches) / padded


def settings_job(steps: int, batch_size: int, repeats: int, results) -> None:
    from dataclasses import replace

    learner = _learner(0, 3, 1)
    adapter = learner.layout_adapter
    stop = threading.Event()
    base = learner.compute
    seconds: dict[tuple[str, str], list[float]] = {s: [] for s in SETTINGS}
    for precision, order in SETTINGS:  # warm-up: first calls of each kernel
        learner.compute = replace(base, precision=precision)
        learner.train(adapter, steps=2, batch_size=batch_size, learning_rate=1e-3, seed=0, stop=stop, batch_order=order)
    for repeat in range(repeats):
        for precision, order in SETTINGS:
            learner.compute = replace(base, precision=precision)
            outcome = learner.train(
                adapter, steps=steps, batch_size=batch_size, learning_rate=1e-3, seed=1 + repeat, stop=stop, batch_order=order
            )
            seconds[precision, order].append(outcome.seconds / outcome.steps)
    for precision, order in SETTINGS:
        width, share = padding(learner, batch_size, order, 1, steps * repeats)
        results.put((precision, order, statistics.median(seconds[precision, order]), width, share))
    results.put(None)


def sharing_job(partition: int, trainers: int, threads: int, steps: int, batch_size: int, start, results) -> None:
    learner = _learner(partition, trainers, threads)
    adapter = learner.layout_adapter
    stop = threading.Event()
    learner.train(adapter, steps=2, batch_size=batch_size, learning_rate=1e-3, seed=0, stop=stop)
    start.wait()  # every trainer starts timing together, so they really share the cores
    outcome = learner.train(adapter, steps=steps, batch_size=batch_size, learning_rate=1e-3, seed=1, stop=stop)
    results.put(outcome.seconds / outcome.steps)


def _in_processes(targets: list[tuple]) -> list:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    processes = [ctx.Process(target=target, args=(*args, results)) for target, args in targets]
    for p in processes:
        p.start()
    try:
        return [results.get(timeout=1800) for _ in processes]
    finally:
        for p in processes:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()


def measure_settings(steps: int, batch_size: int, repeats: int) -> list[tuple]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    process = ctx.Process(target=settings_job, args=(steps, batch_size, repeats, results))
    process.start()
    try:
        return list(iter(lambda: results.get(timeout=1800), None))
    finally:
        process.join(timeout=60)


def measure_sharing(trainers: int, threads: int, steps: int, batch_size: int) -> list[float]:
    start = multiprocessing.get_context("spawn").Barrier(trainers)
    return _in_processes([(sharing_job, (k, trainers, threads, steps, batch_size, start)) for k in range(trainers)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per job")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="turns each setting of part 1 takes")
    parser.add_argument("--skip-sharing", action="store_true", help="part 1 only")
    args = parser.parse_args()
    print(header("train step: default MiniLM + LoRA, packaged tweets, max length 64, batch padded to its longest"))
    print(f"part 1: one trainer, one thread; median of {args.repeats} jobs of {args.steps} steps")
    print(f"{'precision':>9} {'batches':>8} {'s/step':>8} {'x fp32 random':>13} {'width':>6} {'padding':>8}")
    rows = measure_settings(args.steps, args.batch_size, args.repeats)
    reference = next(s for p, o, s, _, _ in rows if (p, o) == ("fp32", "random"))
    for precision, order, seconds, width, share in rows:
        print(f"{precision:>9} {order:>8} {seconds:>8.3f} {seconds / reference:>13.2f} {width:>6.1f} {share:>8.1%}", flush=True)
    if args.skip_sharing:
        return
    print(f"\npart 2: trainers sharing {os.cpu_count()} cores, default precision and batches")
    print(f"{'trainers':>8} {'threads each':>12} {'s/step (mean)':>14} {'slowest':>8} {'steps/s (all)':>14}")
    for trainers, threads in SHARING:
        seconds = measure_sharing(trainers, threads, args.steps, args.batch_size)
        rate = sum(1 / s for s in seconds)
        print(
            f"{trainers:>8} {threads:>12} {statistics.mean(seconds):>14.3f} {max(seconds):>8.3f} {rate:>14.2f}", flush=True
        )


if __name__ == "__main__":
    main()
