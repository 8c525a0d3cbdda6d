"""The coordinator dies or is told to stop: the run resumes exactly, checkpoints stay whole, SIGTERM is clean.

Real `python -m coordinator` and `python -m trainer` processes on a tiny BERT and a small CSV.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.numpy import load_file

from coordinator.outputs import CheckpointError, RunOutputs
from tests.otlp_collector import OtlpCollector
from tests.test_trainer_faults import free_port

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def start(module: str, *args: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as handle:
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV, stdout=handle, stderr=subprocess.STDOUT)


def start_trainers(port: int, flags: list[str], count: int, logs: Path) -> list[subprocess.Popen]:
    return [
        start(
            "trainer", "--partition", str(k), "--num-partitions", str(count), "--coordinator", f"127.0.0.1:{port}",
            "--threads", "1", "--give-up-after", "120", *flags, log=logs / f"trainer-{k}.log",
        )  # fmt: skip
        for k in range(count)
    ]


def wait_for_checkpoint(out: Path, round_: int, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    latest = out / "checkpoints" / "latest.json"
    while not (latest.exists() and json.loads(latest.read_text())["round"] >= round_):
        assert process.poll() is None, "coordinator exited early"
        assert time.monotonic() < deadline, f"no checkpoint of round {round_} within {timeout} s"
        time.sleep(0.05)


def finish(processes: list[subprocess.Popen], timeout: float = 120) -> list[int]:
    codes = []
    for p in processes:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def federation(
    tmp_path: Path, name: str, flags: list[str], crash_after: int | None, coordinator_flags: Sequence[str] = ()
) -> Path:
    """A 4-round, 3-trainer deterministic run; optionally SIGKILL the coordinator after a round and restart it."""
    out, port = tmp_path / name, free_port()
    out.mkdir()
    coordinator_args = [
        "--listen", f"127.0.0.1:{port}", "--out", str(out), "--rounds", "4", "--min-trainers", "3", "--local-steps", "3",
        "--batch-size", "8", "--eval-max-examples", "20", "--deterministic", *flags, *coordinator_flags,
    ]  # fmt: skip
    trainers = start_trainers(port, flags, 3, out)
    coordinator = start("coordinator", *coordinator_args, log=out / "coordinator.log")
    try:
        if crash_after is not None:
            wait_for_checkpoint(out, crash_after, coordinator)
            coordinator.send_signal(signal.SIGKILL)  # mid-run: the next round is in flight
            coordinator.wait()
            coordinator = start("coordinator", *coordinator_args, log=out / "coordinator.log")
        assert finish([coordinator]) == [0], (out / "coordinator.log").read_text()
        assert finish(trainers) == [0, 0, 0], "trainers exit cleanly once the run is over"
    finally:
        for p in [coordinator, *trainers]:
            if p.poll() is None:
                p.kill()
    return out


@pytest.mark.parametrize(
    "learning", [[], ["--server-optimizer", "fedadam", "--server-lr", "0.05", "--proximal-mu", "0.01"]], ids=["fedavg", "fedadam"]
)
def test_killed_coordinator_resumes_at_the_same_round_with_bit_identical_result(
    tmp_path: Path, common_flags, learning: list[str]
) -> None:
    """A server optimiser's state travels in the checkpoint, so a resumed run steps on bit-identically too."""
    reference = federation(tmp_path, "uninterrupted", common_flags, crash_after=None, coordinator_flags=learning)
    resumed = federation(tmp_path, "killed", common_flags, crash_after=2, coordinator_flags=learning)

    log = (resumed / "coordinator.log").read_text()
    assert "Resuming after round 2" in log
    # The restarted process counts only its own rounds (3 and 4) in its summary.
    assert "Finished rounds 3-4 in " in log and "rounds 1-2 ran before the resume." in log
    trainer_logs = "".join((resumed / f"trainer-{k}.log").read_text() for k in range(3))
    assert "registering again" in trainer_logs  # trainers survived the restart and re-registered
    a = load_file(reference / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    rows_a = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows_b] == [0, 1, 2, 3, 4]
    assert [(r["loss"], r["accuracy"]) for r in rows_a] == [(r["loss"], r["accuracy"]) for r in rows_b]
    checkpoint = RunOutputs(resumed).load_latest_checkpoint()
    assert checkpoint is not None
    assert any(k.startswith("server_optimizer/m/") for k in checkpoint.adapter) == bool(learning)


CHECKPOINT_WRITER = """
import sys
import numpy as np
from pathlib import Path
from coordinator.outputs import RunOutputs
outputs = RunOutputs(Path(sys.argv[1]))
latest = outputs.load_latest_checkpoint()
round_ = latest.round if latest else 0
print("writing", flush=True)
while True:
    round_ += 1
    outputs.save_checkpoint(round_, {"w": np.full(4_000_000, round_, dtype=np.float32)}, {"run_id": "r"})
"""


def test_killed_while_writing_a_checkpoint_the_previous_one_stays_valid(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    last = 0
    for _ in range(6):
        writer = subprocess.Popen(
            [sys.executable, "-c", CHECKPOINT_WRITER, str(tmp_path)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True
        )
        assert writer.stdout.readline().strip() == "writing"
        time.sleep(rng.uniform(0.05, 0.6))  # each 16 MB checkpoint takes tens of milliseconds: land mid-write
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        checkpoint = RunOutputs(tmp_path).load_latest_checkpoint()
        assert checkpoint is not None and checkpoint.round >= last
        assert (checkpoint.adapter["w"] == checkpoint.round).all()
        last = checkpoint.round

    latest = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    path = tmp_path / "checkpoints" / latest["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its SHA-256"):
        RunOutputs(tmp_path).load_latest_checkpoint()


def test_sigterm_drains_finishes_the_round_checkpoints_flushes_and_exits_zero(tmp_path: Path, common_flags) -> None:
    out, port = tmp_path / "out", free_port()
    with OtlpCollector() as collector:
        coordinator = subprocess.Popen(
            [
                sys.executable, "-m", "coordinator", "--listen", f"127.0.0.1:{port}", "--out", str(out),
                "--spawn-trainers", "2", "--rounds", "50", "--local-steps", "300", "--batch-size", "8",
                "--eval-max-examples", "20", *common_flags,
            ],  # fmt: skip
            cwd=ROOT, env={**ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            wait_for_checkpoint(out, 1, coordinator)
            coordinator.send_signal(signal.SIGTERM)  # round 2 is in flight
            statuses = health_until_gone(f"127.0.0.1:{port}", out / "pki")
            output, _ = coordinator.communicate(timeout=120)
        finally:
            if coordinator.poll() is None:
                coordinator.kill()
        spans = collector.spans

    assert coordinator.returncode == 0, output
    assert "Stopped by SIGTERM after round 2 (adapter/ holds round 2's adapter)" in output
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["round"] == 2
    # The last completed round's adapter is written as a usable PEFT adapter, not only as a checkpoint.
    checkpoint = RunOutputs(out).load_latest_checkpoint()
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert checkpoint is not None and saved.keys() == checkpoint.adapter.keys()
    assert all(np.array_equal(saved[k], checkpoint.adapter[k]) for k in saved)
    assert sorted(s.attributes["fl.round"] for s in spans if s.name == "fl.round") == [0, 1, 2]
    for k in range(2):
        log = (out / "logs" / f"trainer-{k}.log").read_text()
        assert "coordinator ended the run: the coordinator stopped" in log


def health_until_gone(address: str, pki: Path, timeout: float = 60) -> list[int]:
    """Poll the coordinator's health over mTLS (as site partition-0) until it stops answering; return the statuses seen."""
    statuses = []
    deadline = time.monotonic() + timeout
    credentials = grpc.ssl_channel_credentials(
        (pki / "ca.pem").read_bytes(), (pki / "partition-0.key").read_bytes(), (pki / "partition-0.pem").read_bytes()
    )
    with grpc.secure_channel(address, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                statuses.append(health.Check(health_pb2.HealthCheckRequest(), timeout=1).status)
            except grpc.RpcError:
                break
            time.sleep(0.05)
    return statuses
