"""A serving coordinator (`--serve`) with real processes: runs at once, StopRun, refusals, SIGKILL and resume, HTTP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from coordinator.plots import PLOT_SIZE
from tests.conftest import TOKENIZER_FILES, toy_csv
from tests.harness import REPO
from tests.test_cli import png_size

LABELS = "negative,neutral,positive"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """Another tiny BERT (one layer): a backbone the echo sites do not hold."""
    import torch
    from transformers import BertConfig, BertModel

    directory = tmp_path_factory.mktemp("tiny-bert-b")
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_model_dir / name, directory / name)
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128,
    )  # fmt: skip
    BertModel(config).save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Coordinator:
    """`python -m coordinator --serve` as a child process, on a fixed port so that a restart keeps its address."""

    def __init__(self, state_dir: Path, port: int) -> None:
        self.state_dir, self.port = state_dir, port
        self.address = f"127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "coordinator", "--serve", "--listen", self.address, "--http", "127.0.0.1:0",
             "--state-dir", str(self.state_dir), "--log-level", "INFO"],
            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=open(self.state_dir.parent / "coordinator.err", "ab"), text=True,
        )  # fmt: skip
        for line in self.process.stdout:
            if line.startswith("Status over HTTP at "):
                self.url = line.split(" at ", 1)[1].strip()
                return
        raise AssertionError("the coordinator exited before serving HTTP")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "coordinator", *args, "--coordinator", self.address],
            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    def submit(self, path: Path) -> str:
        return self.cli("submit", str(path)).strip().splitlines()[-1]

    def run(self, run_id: str) -> dict[str, Any]:
        return self.get(f"/runs/{run_id}")

    def wait(self, run_id: str, done: Any, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.run(run_id)
            if done(run):
                return run
            assert run["state"] not in ("failed", "stopped") or done(run), run
            time.sleep(0.2)
        raise AssertionError(f"run {run_id} did not get there in {timeout} s: {self.run(run_id)}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)


def write_toml(path: Path, **settings: Any) -> Path:
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def finished(run: dict[str, Any]) -> bool:
    return run["state"] in ("completed", "failed", "stopped")


def adapter_of(run: dict[str, Any]) -> dict[str, np.ndarray]:
    return load_file(Path(run["out"]) / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_serving_coordinator_hosts_runs_over_long_lived_sites(
    tmp_path: Path, tiny_model_dir: Path, second_model_dir: Path
) -> None:
    data = toy_csv(tmp_path / "toy.csv")
    coordinator = Coordinator(tmp_path / "state", free_port())
    common = {"labels": LABELS, "max-length": 16, "round-timeout": 60.0, "register-timeout": 120.0}
    echo_run = write_toml(tmp_path / "echo.toml", model=str(tiny_model_dir), rounds=3, **{"min-trainers": 3, "local-steps": 2}, **common)
    real = {"model": str(second_model_dir), "min-trainers": 2, "local-steps": 3, "batch-size": 8, "deterministic": True, **common}
    real_run = write_toml(tmp_path / "real.toml", rounds=3, **real)
    long_echo = write_toml(tmp_path / "long-echo.toml", model=str(tiny_model_dir), rounds=200, **{"min-trainers": 3}, **common)
    resumable = write_toml(tmp_path / "resumable.toml", rounds=6, **real)
    sites: list[subprocess.Popen] = []
    try:
        coordinator.start()
        sites.append(subprocess.Popen(
            [sys.executable, "-m", "trainer.echo", "--coordinator", coordinator.address, "--count", "3",
             "--models", str(tiny_model_dir), "--delay", "0.05", "--give-up-after", "120"],
            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
        ))  # fmt: skip
        for k in range(2):
            sites.append(subprocess.Popen(
                [sys.executable, "-m", "trainer", "--partition", str(k), "--num-partitions", "2", "--coordinator",
                 coordinator.address, "--model", str(second_model_dir), "--data", str(data), "--max-length", "16",
                 "--threads", "1", "--log-level", "WARNING"],
                cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
            ))  # fmt: skip

        deadline = time.monotonic() + 60
        while sum(site["live"] for site in coordinator.get("/sites")) < 5:
            assert time.monotonic() < deadline, coordinator.get("/sites")
            time.sleep(0.2)
        # Two runs at once with different models: each row lands in its own run.
        first, second = coordinator.submit(echo_run), coordinator.submit(real_run)
        assert first != second and {r["id"] for r in coordinator.get("/runs")} == {first, second}
        echo_done = coordinator.wait(first, finished)
        real_done = coordinator.wait(second, finished)
        assert echo_done["state"] == real_done["state"] == "completed", (echo_done, real_done)
        echo_rows, real_rows = coordinator.get(f"/runs/{first}/metrics"), coordinator.get(f"/runs/{second}/metrics")
        assert [r["round"] for r in echo_rows] == [r["round"] for r in real_rows] == [0, 1, 2, 3]
        # The sites that lack a run's model refuse it in its first call (round 0's evaluation), named in
        # that row, and are not asked again.
        for rows, refusers, servers in ((echo_rows, {"partition-0", "partition-1"}, 3), (real_rows, {f"echo-{k}" for k in range(3)}, 2)):
            refusals = rows[0]["failures"]
            assert {f["trainer"] for f in refusals} == refusers
            assert all(f["code"] == "FAILED_PRECONDITION" and "does not serve model" in f["reason"] for f in refusals)
            assert rows[0]["evaluators"] == 5
            assert all(r["trainers_sampled"] == r["trainers_accepted"] == servers and not r["failures"] for r in rows[1:])
        assert coordinator.run(first)["config"] == echo_run.read_text()
        assert real_rows[-1]["loss"] < real_rows[0]["loss"]  # the real sites learn
        assert (Path(real_done["out"]) / "metrics.jsonl").read_text().count("\n") == 4
        assert png_size(Path(real_done["out"]) / "plot.png") == PLOT_SIZE

        # StopRun stops one run mid-round; the other goes on to its end.
        stopped, going_on = coordinator.submit(long_echo), coordinator.submit(real_run)
        coordinator.wait(stopped, lambda r: r["completed_rounds"] >= 1)
        assert "stopped" in coordinator.cli("stop", stopped)
        assert coordinator.run(stopped)["state"] == "stopped"
        assert coordinator.wait(going_on, finished)["state"] == "completed"
        logs = coordinator.cli("logs", stopped)
        assert "round 1: ok" in logs and "stopped by an admin" in logs

        # SIGKILL mid-run; a restart lists every run and resumes the unfinished one bit-identically.
        resumed = coordinator.submit(resumable)
        coordinator.wait(resumed, lambda r: r["completed_rounds"] >= 2)
        coordinator.kill()
        coordinator.start()
        listed = coordinator.cli("runs")
        assert all(run_id in listed for run_id in (first, second, stopped, going_on, resumed))
        assert coordinator.wait(resumed, finished, timeout=180)["state"] == "completed"
        reference = coordinator.submit(resumable)
        assert coordinator.wait(reference, finished)["state"] == "completed"
        for key, value in adapter_of(coordinator.run(reference)).items():
            np.testing.assert_array_equal(adapter_of(coordinator.run(resumed))[key], value)
        rows = {run_id: coordinator.get(f"/runs/{run_id}/metrics") for run_id in (resumed, reference)}
        assert [r["loss"] for r in rows[resumed]] == [r["loss"] for r in rows[reference]]
        status = coordinator.get("/status")
        assert status["runs"]["completed"] == 5 and status["runs"]["stopped"] == 1 and status["sites_live"] == 5
        assert {s["name"] for s in coordinator.get("/sites")} == {"echo-0", "echo-1", "echo-2", "partition-0", "partition-1"}
    finally:
        coordinator.stop()
        for site in sites:
            site.send_signal(signal.SIGTERM)
        for site in sites:
            try:
                site.wait(timeout=20)
            except subprocess.TimeoutExpired:
                site.kill()
