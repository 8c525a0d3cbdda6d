"""plot.png: its lines come from the run's metrics.jsonl rows, and it is a PNG of the promised size."""

from __future__ import annotations

from pathlib import Path

from coordinator.plots import PLOT_SIZE, plot_run, series
from tests.test_cli import png_size

ROWS = [
    {"round": 0, "status": "ok", "loss": 1.1, "accuracy": 0.31, "train_loss": None, "trainers_sampled": 0, "trainers_accepted": 0},
    {"round": 1, "status": "ok", "loss": None, "accuracy": None, "train_loss": 1.0, "trainers_sampled": 3, "trainers_accepted": 2},
    {"round": 2, "status": "ok", "loss": 0.8, "accuracy": 0.6, "train_loss": 0.9, "trainers_sampled": 3, "trainers_accepted": 3},
    {"round": 3, "status": "failed", "loss": None, "accuracy": None, "train_loss": None, "trainers_sampled": 3, "trainers_accepted": 1},
]


def test_lines_follow_the_rows_and_skip_missing_values() -> None:
    lines = series(ROWS)
    assert lines["evaluation loss"] == ([0, 2], [1.1, 0.8])  # round 1 did not evaluate
    assert lines["accuracy"] == ([0, 2], [0.31, 0.6])
    assert lines["train loss"] == ([1, 2], [1.0, 0.9])
    assert lines["sites sampled"] == ([1, 2], [3.0, 3.0])  # a failed round changed nothing
    assert lines["sites accepted"] == ([1, 2], [2.0, 3.0])
    assert "ε" not in lines
    private = [{**row, "dp_epsilon": 0.5 * row["round"]} for row in ROWS]
    assert series(private)["ε"] == ([0, 1, 2], [0.0, 0.5, 1.0])


def test_plot_run_writes_a_png_of_the_promised_size(tmp_path: Path) -> None:
    plot_run(ROWS, tmp_path / "plot.png", "run r")
    assert png_size(tmp_path / "plot.png") == PLOT_SIZE
    plot_run([{**row, "dp_epsilon": 1.0} for row in ROWS], tmp_path / "private.png")
    assert png_size(tmp_path / "private.png") == PLOT_SIZE
