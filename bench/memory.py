"""Coordinator memory against echo trainers on loopback: `python -m bench.memory [--quick]`.

Each case runs the coordinator alone in a child process (`--coordinator-only`), so its RSS holds
nothing of the benchmark's, and N echo trainers in another. The coordinator reports its RSS once
every trainer has registered (the baseline, before round 0), after its last round, and its peak
(`ru_maxrss`, over its whole life) both after round 0 and at the end; growth is the final peak
minus the baseline. Round 0 only sends the adapter to every trainer for evaluation, so its peak
is what the broadcast holds; the training rounds add the replies. fedavg folds each reply into
one float32 running sum as it arrives, so its growth should not depend on N; median holds all N
replies until the round ends, so its growth should be about N adapters. At most
`--max-transfers` replies are taken in at once (`transfers`), whatever N.

`Python peak` is tracemalloc's peak over the coordinator's run: what Python objects (arrays,
bytes, messages) held at most, without gRPC's C-core buffers or the allocator's free memory,
which RSS also counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import psutil

from bench.common import header
from bench.round_overhead import (
    REGISTER_TIMEOUT_SECONDS,
    REPO,
    Case,
    create_coordinator,
    start_trainers,
    stop_process,
    versions,
)

TRAINERS = (8, 128)
PARAMS = 1_200_000
AGGREGATORS = ("fedavg", "median")
MB = 1e6


def peak_rss() -> int:
    """Bytes of the largest resident set this process has had (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def coordinate(case: Case, rounds: int) -> dict[str, int]:
    """Run one coordinator, printing its address first; return its RSS figures in bytes."""
    peaks: list[int] = []
    tracemalloc.start()
    with tempfile.TemporaryDirectory(prefix="phalanx-bench-") as tmp:
        app, telemetry = create_coordinator(case, rounds, Path(tmp), lambda row: peaks.append(peak_rss()))
        try:
            print("address", await app.start(), flush=True)
            await app.registry.wait_for(case.trainers, REGISTER_TIMEOUT_SECONDS)
            baseline = psutil.Process().memory_info().rss
            await app.execute()
            after = psutil.Process().memory_info().rss
        finally:
            await app.close("finished")
            telemetry.shutdown()
    python_peak = tracemalloc.get_traced_memory()[1]
    return {"baseline": baseline, "after": after, "round0_peak": peaks[0], "peak": peak_rss(), "python_peak": python_peak}


def measure(case: Case, rounds: int) -> dict[str, int]:
    """Start the coordinator child, then the trainers' child on its address; return the coordinator's report."""
    argv = [
        sys.executable, "-m", "bench.memory", "--coordinator-only", "--trainers", str(case.trainers),
        "--params", str(case.params), "--aggregator", case.aggregator, "--rounds", str(rounds),
        "--max-transfers", str(case.max_transfers),
    ]  # fmt: skip
    coordinator = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert coordinator.stdout is not None
    trainers: subprocess.Popen | None = None
    try:
        first = coordinator.stdout.readline().split()
        if first[:1] == ["address"]:
            trainers = start_trainers(first[1], case.trainers, case.params)
            report = coordinator.stdout.readline()
            if report:
                return json.loads(report)
        raise RuntimeError(f"the coordinator of {case.name} exited with code {coordinator.wait()}")
    except BaseException:  # interrupted or failed: end both children now rather than after their grace
        for process in (coordinator, trainers):
            if process is not None and process.poll() is None:
                process.terminate()
        raise
    finally:
        stop_process(coordinator)
        if trainers is not None:
            stop_process(trainers)


def run(trainers: list[int], params: int, aggregators: list[str], max_transfers: list[int], rounds: int) -> None:
    adapter_mb = 4 * params / MB
    print(header("phalanx coordinator memory: coordinator and echo trainers in separate child processes"))
    print(versions())
    print(f"# P = {params:,}: one float32 adapter is {adapter_mb:.1f} MB; {rounds} training rounds per case")
    print(
        f"{'N':>4} {'aggregator':>10} {'transfers':>9} {'baseline MB':>11} {'after MB':>9} {'peak r0 MB':>10} {'peak MB':>8} "
        f"{'growth MB':>9} {'/ adapter':>9} {'N adapters MB':>13} {'Python peak MB':>14}",
        flush=True,
    )
    for aggregator in aggregators:
        for transfers in max_transfers:
            for n in trainers:
                print_case(Case(n, params, aggregator=aggregator, max_transfers=transfers), rounds, adapter_mb)


def print_case(case: Case, rounds: int, adapter_mb: float) -> None:
    r = measure(case, rounds)
    growth = (r["peak"] - r["baseline"]) / MB
    n = case.trainers
    print(
        f"{n:>4} {case.aggregator:>10} {case.max_transfers:>9} {r['baseline'] / MB:>11.1f} {r['after'] / MB:>9.1f} "
        f"{r['round0_peak'] / MB:>10.1f} {r['peak'] / MB:>8.1f} "
        f"{growth:>9.1f} {growth / adapter_mb:>9.1f} {n * adapter_mb:>13.1f} {r['python_peak'] / MB:>14.1f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 5")
    parser.add_argument("--trainers", type=int, nargs="+", default=list(TRAINERS), help="trainer counts")
    parser.add_argument("--params", type=int, default=PARAMS, help="adapter parameters")
    parser.add_argument("--aggregator", nargs="+", default=list(AGGREGATORS), help="aggregators to compare")
    parser.add_argument(
        "--max-transfers", type=int, nargs="+", default=[Case.max_transfers], help="coordinator --max-transfers values"
    )
    parser.add_argument("--rounds", type=int, help="training rounds per case (default 5, quick 2)")
    parser.add_argument("--coordinator-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up the children on SIGTERM too
    try:
        if args.coordinator_only:
            report = asyncio.run(
                coordinate(
                    Case(
                        args.trainers[0], args.params, aggregator=args.aggregator[0], max_transfers=args.max_transfers[0]
                    ),
                    rounds,
                )
            )
            print(json.dumps(report), flush=True)
            return
        run(args.trainers, args.params, args.aggregator, args.max_transfers, rounds)
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit(130)


if __name__ == "__main__":
    main()
