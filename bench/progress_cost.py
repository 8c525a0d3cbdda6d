"""What a site's step reports cost its training: `python -m bench.progress_cost [--steps 20] [--repeats 3]`.

One real trainer (the default backbone, LoRA and a partition of the packaged tweets, one torch
thread, the default precision and batch order) runs `Learner.train` as a Train call does, in a
worker thread beside an event loop. Jobs with and without a `StepReporter` take turns, so the
machine's drift falls on both alike; with it, the loop collects the reports as the servicer
does (`StepReporter.reports_until`). Printed: the median seconds per step of each, their ratio,
and the reports a job sent with their bytes on the wire (a report is a TrainResponse message).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading

from bench.common import header


async def job(learner, steps: int, batch_size: int, seed: int, report: bool) -> tuple[float, int, int]:
    """Seconds per step of one job, and the reports it sent with their bytes."""
    from phalanx.v1 import trainer_pb2
    from trainer.progress import StepReporter

    reporter = StepReporter(asyncio.get_running_loop()) if report else None
    train = asyncio.ensure_future(
        asyncio.to_thread(
            learner.train, learner.layout_adapter, steps=steps, batch_size=batch_size, learning_rate=1e-3, seed=seed,
            stop=threading.Event(), on_step=reporter,
        )
    )  # fmt: skip
    reports = nbytes = 0
    if reporter is not None:
        async for progress in reporter.reports_until(train):
            reports += 1
            nbytes += trainer_pb2.TrainResponse(progress=progress).ByteSize()
    outcome = await train
    return outcome.seconds / outcome.steps, reports, nbytes


async def measure(steps: int, batch_size: int, repeats: int) -> None:
    os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    import torch

    torch.set_num_threads(1)
    from phalanx.model import ModelConfig
    from phalanx.sites import DataConfig, load_site
    from trainer.device import Compute
    from trainer.learner import Learner

    learner = Learner(ModelConfig(num_labels=3), load_site(DataConfig(), 0, 3), Compute.choose("cpu", "auto"))
    await job(learner, 2, batch_size, 0, True)  # warm-up
    seconds: dict[bool, list[float]] = {False: [], True: []}
    sent: list[tuple[int, int]] = []
    for repeat in range(repeats):
        for report in (False, True):
            per_step, reports, nbytes = await job(learner, steps, batch_size, 1 + repeat, report)
            seconds[report].append(per_step)
            if report:
                sent.append((reports, nbytes))
    plain, reported = statistics.median(seconds[False]), statistics.median(seconds[True])
    print(header("bench.progress_cost"))
    print(f"# {steps} steps a job, batch {batch_size}, {repeats} jobs each, {learner.compute.device.type}, {learner.compute.precision}")
    print(f"{'':<16}{'s/step':>10}")
    print(f"{'no reports':<16}{plain:>10.4f}")
    print(f"{'with reports':<16}{reported:>10.4f}   ×{reported / plain:.3f}")
    reports, nbytes = max(sent)
    print(f"reports per job: {reports} ({nbytes} bytes, {nbytes / max(reports, 1):.1f} bytes each) for {steps} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(measure(args.steps, args.batch_size, args.repeats))


if __name__ == "__main__":
    main()
