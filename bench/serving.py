"""What two runs at once cost on one serving federation:
`python -m bench.serving [--rounds N --local-steps N --eval-max-examples N]`.

One serving coordinator (`python -m coordinator --serve`) runs as a child process with two spawned
trainers (`--spawn-trainers 2 --trainer-threads 1 --insecure`: the default model and the packaged
tweets data, partitions 0 and 1), its state in a temporary folder. Once both sites are live it hosts,
in this order: run A alone, run B alone, then A and B again submitted together. A and B differ only in
their seed (1 and 2): two independent experiments of the same size.

Per run and phase, from its rows over HTTP after round 0 (the initial evaluation): the mean seconds
per round (`seconds`) and of its train and evaluate phases, the run's wall time (`finished` -
`started`) and its final accuracy. The last line compares the runs at once with the runs alone: how
much longer each run's rounds take, and the wall time of both together against one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import header

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
SITES = 2
ENDED = ("completed", "failed", "stopped")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Coordinator:
    """`python -m coordinator --serve --spawn-trainers 2` as a child process, driven over its CLI and HTTP."""

    def __init__(self, state_dir: Path, port: int) -> None:
        self.state_dir, self.port = state_dir, port
        self.address = f"127.0.0.1:{port}"
        self.stderr_path = state_dir.parent / "coordinator.err"
        self.process: subprocess.Popen[str] | None = None
        self.url = ""
        self.output: list[str] = []

    def start(self) -> None:
        command = [
            sys.executable, "-m", "coordinator", "--serve", "--listen", self.address, "--http", "127.0.0.1:0",
            "--state-dir", str(self.state_dir), "--spawn-trainers", str(SITES), "--trainer-threads", "1",
            "--insecure", "--log-level", "WARNING",
        ]  # fmt: skip
        with open(self.stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=stderr, text=True
            )
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if line.startswith("Status over HTTP at "):
                self.url = line.split(" at ", 1)[1].strip()
                threading.Thread(target=self._drain, daemon=True).start()
                return
        raise SystemExit(f"the coordinator exited before serving HTTP\n{self.stderr_tail()}")

    def _drain(self) -> None:
        """Keep reading the coordinator's stdout so that it never blocks on a full pipe."""
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def submit(self, path: Path) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "coordinator", "submit", str(path), "--coordinator", self.address],
            check=False, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"submit {path.name} failed: {done.stderr.strip()}")
        return done.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if the coordinator has not exited within 30 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def wait_until(what: str, check: Callable[[], bool], timeout: float, coordinator: Coordinator) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if coordinator.process is not None and coordinator.process.poll() is not None:
            raise SystemExit(f"the coordinator exited while waiting for {what}\n{coordinator.stderr_tail()}")
        if time.monotonic() > deadline:
            raise SystemExit(f"no {what} after {timeout:.0f} s\n{coordinator.stderr_tail()}")
        time.sleep(0.5)


def wait_for_sites(coordinator: Coordinator, timeout: float) -> None:
    def live() -> bool:
        return sum(bool(site["live"]) for site in coordinator.get("/sites")) >= SITES

    wait_until(f"{SITES} live sites", live, timeout, coordinator)


def wait_for_runs(coordinator: Coordinator, run_ids: list[str], timeout: float) -> None:
    def ended() -> bool:
        return all(coordinator.get(f"/runs/{run_id}")["state"] in ENDED for run_id in run_ids)

    wait_until(f"end of run(s) {', '.join(run_ids)}", ended, timeout, coordinator)
    for run_id in run_ids:
        run = coordinator.get(f"/runs/{run_id}")
        if run["state"] != "completed":
            raise SystemExit(f"run {run_id} ended {run['state']}: {run.get('reason', '')}")


def write_toml(path: Path, **settings: Any) -> Path:
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items()))
    return path


def run_tomls(folder: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Run A and run B: the same settings but for the seed."""
    common = {
        "rounds": args.rounds,
        "local-steps": args.local_steps,
        "min-trainers": SITES,
        "eval-max-examples": args.eval_max_examples,
    }
    seeds = {"A": 1, "B": 2}
    return {name: write_toml(folder / f"{name}.toml", **common, seed=seed) for name, seed in seeds.items()}


@dataclass
class Result:
    phase: str
    name: str
    round_seconds: float
    train_seconds: float
    evaluate_seconds: float
    started: float
    finished: float
    accuracy: float | None

    @property
    def wall_seconds(self) -> float:
        return self.finished - self.started


def mean_of(rows: list[dict[str, Any]], key: str) -> float:
    values = [row[key] for row in rows if row.get(key) is not None]
    return statistics.fmean(values) if values else float("nan")


def result_of(coordinator: Coordinator, phase: str, name: str, run_id: str) -> Result:
    run = coordinator.get(f"/runs/{run_id}")
    rows = coordinator.get(f"/runs/{run_id}/metrics")
    rounds = rows[1:]
    return Result(
        phase, name,
        mean_of(rounds, "seconds"), mean_of(rounds, "train_seconds"), mean_of(rounds, "evaluate_seconds"),
        float(run["started"]), float(run["finished"]), rows[-1].get("accuracy") if rows else None,
    )  # fmt: skip


def run_phase(coordinator: Coordinator, phase: str, tomls: dict[str, Path], timeout: float) -> list[Result]:
    """Submit every run of `tomls` at once, wait for all of them and read their rows."""
    ids = {name: coordinator.submit(path) for name, path in tomls.items()}
    wait_for_runs(coordinator, list(ids.values()), timeout)
    return [result_of(coordinator, phase, name, run_id) for name, run_id in ids.items()]


def table(results: list[Result]) -> str:
    columns = ("s/round", "train s", "eval s", "wall s", "accuracy")
    widths = (8, 8, 7, 7, 9)
    lines = [f"{'phase':<10} {'run':<4} " + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths))]
    for r in results:
        accuracy = f"{r.accuracy:.3f}" if r.accuracy is not None else "-"
        lines.append(
            f"{r.phase:<10} {r.name:<4} {r.round_seconds:>8.2f} {r.train_seconds:>8.2f}"
            f" {r.evaluate_seconds:>7.2f} {r.wall_seconds:>7.1f} {accuracy:>9}"
        )
    return "\n".join(lines)


def summary(alone: list[Result], together: list[Result]) -> str:
    by_name = {r.name: r for r in alone}
    slowdown = statistics.fmean(r.round_seconds / by_name[r.name].round_seconds for r in together)
    both = max(r.finished for r in together) - min(r.started for r in together)
    serial = sum(r.wall_seconds for r in alone)
    return (
        f"together: each run's rounds take {slowdown:.2f} x as long as alone; "
        f"both finish in {both:.1f} s against {serial:.1f} s one after the other"
    )


def benchmark(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        folder = Path(tmp)
        tomls = run_tomls(folder, args)
        coordinator = Coordinator(folder / "state", free_port())
        try:
            coordinator.start()
            wait_for_sites(coordinator, args.timeout)
            alone = [
                *run_phase(coordinator, "alone", {"A": tomls["A"]}, args.timeout),
                *run_phase(coordinator, "alone", {"B": tomls["B"]}, args.timeout),
            ]
            together = run_phase(coordinator, "together", tomls, args.timeout)
        finally:
            coordinator.stop()
    print(
        f"two runs at once on one federation ({SITES} spawned sites x 1 thread, default model, "
        f"{args.rounds} rounds x {args.local_steps} steps)"
    )
    print(table(alone + together))
    print(summary(alone, together))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serving",
        description="Seconds per round of two runs alone and at once on one serving coordinator.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run")
    parser.add_argument("--local-steps", type=int, default=5, help="optimizer steps per trainer per round")
    parser.add_argument("--eval-max-examples", type=int, default=100, help="test examples per trainer")
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds to wait for the sites and for each phase"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(header("bench.serving"))
    benchmark(args)


if __name__ == "__main__":
    main()
