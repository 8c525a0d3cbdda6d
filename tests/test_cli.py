"""The real commands: `python -m coordinator --spawn-trainers 2` on the packaged MiniLM and tweets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.__main__ import build_parser as coordinator_parser
from coordinator.plots import PLOT_SIZE
from phalanx.cli import parse_with_config
from tests.otlp_collector import OtlpCollector, ReceivedSpan
from trainer.__main__ import build_parser as trainer_parser

ROOT = Path(__file__).resolve().parent.parent
DESIGN_FLAGS = {
    "coordinator": [
        "--listen", "--rounds", "--min-trainers", "--fraction-train", "--local-steps", "--round-timeout", "--out",
        "--config", "--spawn-trainers",
    ],
    "trainer": ["--partition", "--num-partitions", "--coordinator", "--listen", "--data", "--model"],
}  # fmt: skip


def run_module(
    module: str, *args: str, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("module", ["coordinator", "trainer"])
def test_help_lists_every_design_flag_with_defaults(module: str) -> None:
    result = run_module(module, "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in DESIGN_FLAGS[module]:
        assert flag in result.stdout
    assert "(default: 127.0.0.1" in " ".join(result.stdout.split())


def test_config_file_sets_defaults_and_flags_win(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('rounds = 7\nlocal-steps = 3\nlisten = "127.0.0.1:6000"\n')
    args = parse_with_config(coordinator_parser(), ["--config", str(config), "--rounds", "2"])
    assert (args.rounds, args.local_steps, args.listen) == (2, 3, "127.0.0.1:6000")
    config.write_text('ca = "certs/ca.pem"\ncert = "certs/coordinator.pem"\nkey = "certs/coordinator.key"\nallow-sites = "a"\n')
    args = parse_with_config(coordinator_parser(), ["--config", str(config)])
    assert (args.ca, args.cert, args.key, args.allow_sites) == tuple(
        Path(p) for p in ("certs/ca.pem", "certs/coordinator.pem", "certs/coordinator.key", "a")
    )
    config.write_text("round = 7\n")
    with pytest.raises(SystemExit):
        parse_with_config(coordinator_parser(), ["--config", str(config)])
    assert trainer_parser().parse_args(["--partition", "1"]).partition == 1


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("rounds = 2.5\n", "rounds must be an integer, not '2.5'"),
        ("min-trainers = [1, 2]\n", "min-trainers must be an integer, not '[1, 2]'"),
        ("fresh = 1\n", "fresh must be true or false"),
        ('aggregator = "mean"\n', "aggregator must be one of fedavg"),
    ],
)
def test_config_values_of_the_wrong_type_are_refused_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, says: str
) -> None:
    config = tmp_path / "run.toml"
    config.write_text(text)
    with pytest.raises(SystemExit):
        parse_with_config(coordinator_parser(), ["--config", str(config)])
    assert f"in {config}: {says}" in capsys.readouterr().err
    config.write_text("lr = 1\nrounds = 3\n")  # an integer where a float is asked is fine
    assert parse_with_config(coordinator_parser(), ["--config", str(config)]).lr == 1.0


@pytest.mark.parametrize("module", ["coordinator", "trainer"])
def test_a_missing_model_directory_is_named_at_once(tmp_path: Path, module: str) -> None:
    missing = tmp_path / "no-such-model"
    result = run_module(module, *(["--partition", "0"] if module == "trainer" else []), "--model", str(missing), timeout=60)
    assert result.returncode == 2
    assert f"--model {missing}: no such directory" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag", ["--listen", "--http"])
def test_a_busy_port_is_refused_before_anything_loads_or_is_written(tmp_path: Path, common_flags: list[str], flag: str) -> None:
    out = tmp_path / "out"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = f"127.0.0.1:{holder.getsockname()[1]}"
        mode = ["--serve", "--state-dir", str(out), "--http", busy] if flag == "--http" else ["--listen", busy, "--out", str(out)]
        result = run_module("coordinator", *mode, "--spawn-trainers", "2", *common_flags, timeout=60)
    assert result.returncode == 2
    assert f"cannot listen on '{busy}': Address already in use" in result.stderr
    assert not out.exists() and "Traceback" not in result.stderr


def test_an_interrupt_before_any_round_says_so(tmp_path: Path, common_flags: list[str]) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "--listen", "127.0.0.1:0", "--out", str(tmp_path / "out"), *common_flags],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if "waiting for 2 trainers" in line:
                break
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    assert "Stopped by SIGINT before any round completed; run again with the same --out to resume." in output
    assert not (tmp_path / "out" / "adapter").exists()


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; fails unless the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def run_federation(out: Path, *args: str, timeout: float, env: dict[str, str] | None = None) -> list[dict]:
    result = run_module(
        "coordinator", "--spawn-trainers", "2", "--listen", "127.0.0.1:0", "--out", str(out), "--fresh", *args,
        timeout=timeout, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Finished" in result.stdout
    assert f"outputs in {out}: metrics.jsonl, plot.png, adapter/ (PEFT), checkpoints/, logs/" in result.stdout
    # The default federation runs over mutual TLS with a throwaway CA it provisions under --out.
    assert f"Mutual TLS with a throwaway CA in {out / 'pki'}" in result.stdout
    assert all((out / "pki" / f"{name}.key").stat().st_mode & 0o777 == 0o600 for name in ("coordinator", "partition-0"))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_outputs_and_adapter_loads(out: Path, rounds: int) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from phalanx.model import DEFAULT_MODEL, resolve_model_path

    assert (out / "checkpoints" / "latest.json").exists()
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["round"] == rounds
    assert png_size(out / "plot.png") == PLOT_SIZE
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(DEFAULT_MODEL), num_labels=3)
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    batch = {"input_ids": torch.tensor([[101, 2307, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    assert model(**batch).logits.shape == (1, 3)


def assert_one_trace_per_round(spans: list[ReceivedSpan], rounds: int, trainers: int) -> None:
    """Across processes: each trainer span has its round's fl.round span as an ancestor, same trace."""
    by_id = {s.span_id: s for s in spans}
    round_spans = {s.attributes["fl.round"]: s for s in spans if s.name == "fl.round"}
    assert sorted(round_spans) == list(range(rounds + 1))
    assert {s.service for s in round_spans.values()} == {"phalanx-coordinator"}
    client = [s for s in spans if s.name in ("fl.client.train", "fl.client.evaluate")]
    assert len(client) == trainers * rounds + trainers * (rounds + 1)
    for span in client:
        assert span.service == "phalanx-trainer"
        target = round_spans[span.attributes["fl.round"]]
        node = span
        while node.parent_span_id and node.parent_span_id in by_id and node is not target:
            node = by_id[node.parent_span_id]
        assert node is target and span.trace_id == target.trace_id


def test_spawned_federation_on_real_minilm_learns_and_exports_otlp(tmp_path: Path) -> None:
    with OtlpCollector() as collector:
        rows = run_federation(
            tmp_path, "--rounds", "3", "--local-steps", "8", "--batch-size", "16", "--lr", "2e-3",
            "--eval-max-examples", "200", timeout=600, env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint},
        )  # fmt: skip
    assert_one_trace_per_round(collector.spans, rounds=3, trainers=2)
    assert {"fl.round.loss", "fl.round.accuracy", "fl.round.clients", "fl.client.examples", "fl.client.loss"} <= (
        collector.metric_names
    )
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["trainers_accepted"] == 2 and r["trainers_failed"] == 0 for r in rows[1:])
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    assert all(r["bytes_received"] >= 2 * r["adapter_bytes"] for r in rows[1:])
    assert_outputs_and_adapter_loads(tmp_path, rounds=3)


@pytest.mark.slow
def test_federation_beats_the_majority_class(tmp_path: Path) -> None:
    """About 240 effective steps: accuracy leaves the majority-class rate (0.43 on this data)."""
    rows = run_federation(
        tmp_path, "--rounds", "8", "--local-steps", "30", "--batch-size", "32", "--eval-max-examples", "400",
        timeout=1500,
    )  # fmt: skip
    assert rows[-1]["accuracy"] > 0.5, [r["accuracy"] for r in rows]
    assert rows[-1]["loss"] < rows[0]["loss"]
