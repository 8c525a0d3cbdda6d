"""plot.png: how a run learned, drawn from its metrics.jsonl rows (matplotlib, no display needed).

Panels: evaluation loss and train loss per round; evaluation accuracy per round; sites per round
(sampled and accepted); and ε per round when the run is differentially private. Repeated runs
(`--repetitions`) get one plot of their summary: the mean of each metric per round, in a band
from the lowest to the highest repetition, and a narrower one of ± one standard deviation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

PLOT_SIZE = (1600, 1000)
"""Pixels of plot.png, width × height."""
_DPI = 100


def series(rows: Sequence[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """The plotted lines, by name: (rounds, values), each left out where its value is missing."""
    names = {
        "evaluation loss": "loss",
        "train loss": "train_loss",
        "accuracy": "accuracy",
        "sites sampled": "trainers_sampled",
        "sites accepted": "trainers_accepted",
        "ε": "dp_epsilon",
    }
    lines = {}
    for label, field in names.items():
        points = [(r["round"], float(r[field])) for r in rows if r.get(field) is not None and r.get("status", "ok") == "ok"]
        if label.startswith("sites"):
            points = [(round_, value) for round_, value in points if round_ > 0]
        if points:
            rounds, values = zip(*points, strict=True)
            lines[label] = (list(rounds), list(values))
    return lines


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def plot_run(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """Write plot.png of `rows` to `path` (blocking: call it in a worker thread)."""
    plt = _pyplot()
    lines = series(rows)
    panels = [("loss", ("evaluation loss", "train loss")), ("accuracy", ("accuracy",)), ("sites", ("sites sampled", "sites accepted"))]
    if "ε" in lines:
        panels.append(("ε spent", ("ε",)))
    figure, axes = plt.subplots(2, 2, figsize=(PLOT_SIZE[0] / _DPI, PLOT_SIZE[1] / _DPI), dpi=_DPI)
    for axis, (ylabel, labels) in zip(axes.flat, panels, strict=False):
        for label in labels:
            if label in lines:
                axis.plot(*lines[label], marker="o", label=label)
        axis.set_xlabel("round")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if len(labels) > 1:
            axis.legend()
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=_DPI)
    plt.close(figure)


def plot_repetitions(summary: dict[str, Any], path: Path, title: str = "") -> None:
    """Write the plot of a `coordinator.repetitions.summarise` summary to `path` (blocking)."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(PLOT_SIZE[0] / _DPI, PLOT_SIZE[1] / _DPI), dpi=_DPI)
    for axis, metric in zip(axes, ("loss", "accuracy"), strict=True):
        points = [(r["round"], r[metric]) for r in summary["rounds"] if r[metric]["mean"] is not None]
        if points:
            rounds = [round_ for round_, _ in points]
            mean = [s["mean"] for _, s in points]
            std = [s["std"] or 0.0 for _, s in points]
            axis.fill_between(rounds, [s["min"] for _, s in points], [s["max"] for _, s in points], alpha=0.15, label="min–max")
            axis.fill_between(
                rounds, [m - d for m, d in zip(mean, std, strict=True)], [m + d for m, d in zip(mean, std, strict=True)],
                alpha=0.3, label="± 1 sd",
            )  # fmt: skip
            axis.plot(rounds, mean, marker="o", label=f"mean of {summary['repetitions']}")
        axis.set_xlabel("round")
        axis.set_ylabel(f"evaluation {metric}")
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=_DPI)
    plt.close(figure)
