"""plot.png: how a run learned, drawn from its metrics.jsonl rows (matplotlib, no display needed).

Panels: evaluation loss and train loss per round; evaluation accuracy per round; sites per round
(sampled and accepted); and ε per round when the run is differentially private.
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


def plot_run(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """Write plot.png of `rows` to `path` (blocking: call it in a worker thread)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

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
