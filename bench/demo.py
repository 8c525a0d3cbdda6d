"""The default demo end to end, before and after the compute settings, in one sitting.

Runs `python -m coordinator --spawn-trainers 3` (default model, data, rounds and steps; mutual
TLS with a throwaway CA) once per variant, one after the other on the same machine, and prints
its wall time, seconds per round (train and evaluate), and the final evaluation accuracy and
loss from metrics.jsonl. The first variant is the trainers' former way (float32, batches drawn
at random); the others change one setting at a time up to today's defaults.

    python -m bench.demo [--variants before,fp32-grouped,after] [--rounds 8] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import header

VARIANTS = {
    "before": ["--precision", "fp32", "--batch-order", "random"],
    "fp32-grouped": ["--precision", "fp32", "--batch-order", "grouped"],
    "bf16-random": ["--precision", "bf16", "--batch-order", "random"],
    "after": [],
}
"""Flags over the demo's defaults; "after" is the defaults themselves (--precision auto, grouped batches)."""


def run_demo(out: Path, flags: list[str], rounds: int) -> tuple[float, list[dict]]:
    command = [
        sys.executable, "-m", "coordinator", "--spawn-trainers", "3", "--listen", "127.0.0.1:0",
        "--out", str(out), "--fresh", "--rounds", str(rounds), *flags,
    ]  # fmt: skip
    started = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "wb") as log:
        code = subprocess.run(command, check=False, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"the demo {' '.join(flags) or '(defaults)'} exited with {code}; see {out.parent / out.name}.log")
    return wall, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="before,fp32-grouped,after", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--keep", type=Path, help="keep each variant's --out (and log) under this directory")
    args = parser.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(unknown)}")
    print(header(f"default demo: 3 spawned sites x {args.rounds} rounds x 15 steps, packaged tweets, default model"))
    print(
        f"{'variant':>13} {'wall s':>7} {'x first':>7} {'s/round':>8} {'train s':>8} {'eval s':>7} "
        f"{'accuracy':>8} {'loss':>7} {'train loss':>10}"
    )
    first = None
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        for name in names:
            wall, rows = run_demo(root / name, VARIANTS[name], args.rounds)
            first = first or wall
            trained = [r for r in rows if r["round"] > 0]
            last = rows[-1]
            print(
                f"{name:>13} {wall:>7.1f} {wall / first:>7.2f} {statistics.mean(r['seconds'] for r in trained):>8.2f} "
                f"{statistics.mean(r['train_seconds'] for r in trained):>8.2f} "
                f"{statistics.mean(r['evaluate_seconds'] for r in trained):>7.2f} "
                f"{last['accuracy']:>8.3f} {last['loss']:>7.4f} {last['train_loss']:>10.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
