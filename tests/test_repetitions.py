"""--repetitions: one run per seed on the same sites, each in its own folder, summarised per round and per run."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest

from coordinator.outputs import CheckpointError
from coordinator.plots import PLOT_SIZE, plot_repetitions
from coordinator.repetitions import Repetition, finished_seeds, summarise, summary_csv, write_summary
from tests.test_cli import png_size, run_module


def row(round_: int, loss: float | None, accuracy: float | None, status: str = "ok", **more) -> dict:
    return {"round": round_, "status": status, "loss": loss, "accuracy": accuracy, **more}


REPETITIONS = [
    Repetition(0, "a", [row(0, 1.1, 0.3), row(1, 0.9, 0.5), row(2, 0.7, 0.7)], seconds=10.0),
    # A retried round (its failed row first), and a round that did not evaluate.
    Repetition(1, "b", [row(0, 1.0, 0.4), row(1, None, None, "failed"), row(1, 0.8, 0.6), row(2, None, None), row(3, 0.5, 0.9)]),
    # Stopped early by a rule.
    Repetition(2, "c", [row(0, 1.2, 0.2), row(1, 0.6, 0.8, stop_reason="reached --target-accuracy 0.8")], "reached --target-accuracy 0.8"),
]


def test_each_round_is_summarised_over_the_repetitions_that_evaluated_it() -> None:
    summary = summarise(REPETITIONS)
    by_round = {r["round"]: r for r in summary["rounds"]}
    assert sorted(by_round) == [0, 1, 2, 3]
    assert by_round[0]["repetitions"] == 3
    assert by_round[0]["accuracy"] == pytest.approx({"mean": 0.3, "std": 0.1, "min": 0.2, "max": 0.4})
    assert by_round[1]["loss"] == pytest.approx(
        {"mean": statistics.fmean([0.9, 0.8, 0.6]), "std": statistics.stdev([0.9, 0.8, 0.6]), "min": 0.6, "max": 0.9}
    )
    assert by_round[2]["repetitions"] == 1 and by_round[2]["accuracy"] == {"mean": 0.7, "std": None, "min": 0.7, "max": 0.7}
    assert by_round[3]["accuracy"]["mean"] == 0.9
    runs = {r["seed"]: r for r in summary["runs"]}
    assert runs[0] == {
        "seed": 0, "folder": "seed-0", "run_id": "a", "rounds_completed": 2, "final_round": 2, "final_loss": 0.7,
        "final_accuracy": 0.7, "stop_reason": "", "seconds": 10.0,
    }  # fmt: skip
    assert (runs[1]["rounds_completed"], runs[1]["final_round"], runs[1]["final_accuracy"]) == (3, 3, 0.9)
    assert runs[2]["stop_reason"] == "reached --target-accuracy 0.8" and runs[2]["final_round"] == 1
    assert summary["final"]["accuracy"] == pytest.approx(
        {"mean": statistics.fmean([0.7, 0.9, 0.8]), "std": statistics.stdev([0.7, 0.9, 0.8]), "min": 0.7, "max": 0.9}
    )
    assert summary["seeds"] == [0, 1, 2] and summary["repetitions"] == 3


def test_the_csv_holds_the_json_figures_per_round(tmp_path: Path) -> None:
    summary = summarise(REPETITIONS)
    lines = list(csv.DictReader(io.StringIO(summary_csv(summary))))
    assert [int(line["round"]) for line in lines] == [0, 1, 2, 3]
    assert float(lines[1]["loss_mean"]) == pytest.approx(summary["rounds"][1]["loss"]["mean"])
    assert lines[2]["accuracy_std"] == ""  # one repetition: no spread
    write_summary(tmp_path, summary)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "summary.csv").read_text() == summary_csv(summary)
    assert set(finished_seeds(tmp_path)) == {0, 1, 2}


def test_a_summary_that_cannot_be_read_is_refused_by_name(tmp_path: Path) -> None:
    assert finished_seeds(tmp_path) == {}
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="summary.json cannot be read"):
        finished_seeds(tmp_path)


def test_the_band_plot_is_a_png_of_the_promised_size(tmp_path: Path) -> None:
    plot_repetitions(summarise(REPETITIONS), tmp_path / "plot.png", "3 repetitions")
    assert png_size(tmp_path / "plot.png") == PLOT_SIZE


def test_repetitions_run_per_seed_on_the_same_sites_and_summarise(tmp_path: Path, common_flags: list[str]) -> None:
    out = tmp_path / "out"
    flags = [
        "--spawn-trainers", "2", "--listen", "127.0.0.1:0", "--out", str(out), "--rounds", "2", "--local-steps", "4",
        "--batch-size", "8", "--repetitions", "2", "--seed", "5", *common_flags,
    ]  # fmt: skip
    result = run_module("coordinator", *flags, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Repetition 2 of 2: seed 6" in result.stdout
    assert f"outputs in {out}: summary.csv, summary.json, plot.png, seed-5/, seed-6/" in result.stdout
    rows = {}
    for seed in (5, 6):
        folder = out / f"seed-{seed}"
        assert (folder / "adapter" / "adapter_config.json").exists() and png_size(folder / "plot.png") == PLOT_SIZE
        rows[seed] = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows[seed]] == [0, 1, 2]
    assert rows[5][0]["loss"] != rows[6][0]["loss"]  # a fresh adapter per seed
    # The same two sites served both runs: one trainer process each, started once.
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["trainer-0.log", "trainer-1.log"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [5, 6]
    for r in summary["rounds"]:
        values = [rows[seed][r["round"]]["accuracy"] for seed in (5, 6)]
        assert r["accuracy"]["mean"] == pytest.approx(statistics.fmean(values))
        assert r["accuracy"]["min"] == min(values) and r["accuracy"]["max"] == max(values)
    assert [run["final_accuracy"] for run in summary["runs"]] == [rows[5][-1]["accuracy"], rows[6][-1]["accuracy"]]
    assert png_size(out / "plot.png") == PLOT_SIZE

    again = run_module("coordinator", *flags, timeout=60)  # every repetition finished: nothing is run again
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 finished earlier" in again.stdout and "Started" not in again.stdout
    assert json.loads((out / "summary.json").read_text()) == summary
