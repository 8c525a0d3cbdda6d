"""Repeated experiments: one run per seed (seed, seed+1, ...), summarised per round and per repetition.

`summarise` turns each repetition's rows (its metrics.jsonl) into summary.json's content;
`write_summary` writes summary.json and summary.csv. A round's figures are taken over the
repetitions that evaluated it; the standard deviation is the sample one (n − 1), absent for one value.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.outputs import CheckpointError, write_atomic

METRICS = ("loss", "accuracy")
STATS = ("mean", "std", "min", "max")
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"


def seed_folder(seed: int) -> str:
    """The folder of the repetition with `seed`, inside --out."""
    return f"seed-{seed}"


@dataclass(frozen=True)
class Repetition:
    seed: int
    run_id: str
    rows: Sequence[Mapping[str, Any]]
    stop_reason: str = ""
    seconds: float = 0.0
    """Wall seconds the repetition took (the process that finished it)."""

    def evaluated(self) -> dict[int, Mapping[str, Any]]:
        """The last successful row of each round that has an evaluation, by round."""
        return {r["round"]: r for r in self.rows if r.get("status") == "ok" and r.get("accuracy") is not None}

    def to_json(self) -> dict[str, Any]:
        evaluated = self.evaluated()
        last = evaluated[max(evaluated)] if evaluated else {}
        trained = [r["round"] for r in self.rows if r.get("status") == "ok" and r["round"] > 0]
        return {
            "seed": self.seed,
            "folder": seed_folder(self.seed),
            "run_id": self.run_id,
            "rounds_completed": max(trained, default=0),
            "final_round": last.get("round"),
            "final_loss": last.get("loss"),
            "final_accuracy": last.get("accuracy"),
            "stop_reason": self.stop_reason,
            "seconds": round(self.seconds, 3),
        }


def describe(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, sample standard deviation (None for fewer than two values), min and max."""
    if not values:
        return dict.fromkeys(STATS)
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def summarise(repetitions: Sequence[Repetition]) -> dict[str, Any]:
    """summary.json's content: per round and finally, the loss and accuracy over the repetitions; each repetition's end."""
    evaluated = [rep.evaluated() for rep in repetitions]
    rounds = sorted({round_ for rounds in evaluated for round_ in rounds})
    per_round = []
    for round_ in rounds:
        rows = [rounds_[round_] for rounds_ in evaluated if round_ in rounds_]
        per_round.append(
            {"round": round_, "repetitions": len(rows), **{m: describe([float(r[m]) for r in rows if r.get(m) is not None]) for m in METRICS}}
        )
    finals = [rep.to_json() for rep in repetitions]
    return {
        "repetitions": len(repetitions),
        "seeds": [rep.seed for rep in repetitions],
        "rounds": per_round,
        "final": {m: describe([f[f"final_{m}"] for f in finals if f[f"final_{m}"] is not None]) for m in METRICS},
        "runs": finals,
    }


def summary_csv(summary: Mapping[str, Any]) -> str:
    """summary.csv: one line per round, with the figures of each metric over the repetitions."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["round", "repetitions", *(f"{m}_{s}" for m in METRICS for s in STATS)])
    for row in summary["rounds"]:
        writer.writerow([row["round"], row["repetitions"], *(_cell(row[m][s]) for m in METRICS for s in STATS)])
    return out.getvalue()


def _cell(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else repr(round(value, 6))


def write_summary(out: Path, summary: Mapping[str, Any]) -> None:
    """Write summary.json and summary.csv into `out` (each replaced whole)."""
    write_atomic(out / SUMMARY_JSON, (json.dumps(summary, indent=2) + "\n").encode())
    write_atomic(out / SUMMARY_CSV, summary_csv(summary).encode())


def finished_seeds(out: Path) -> dict[int, dict[str, Any]]:
    """The repetitions an earlier process finished, by seed, from the summary.json in `out` (none if absent)."""
    try:
        summary = json.loads((out / SUMMARY_JSON).read_text())
        return {int(run["seed"]): run for run in summary["runs"]}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{out / SUMMARY_JSON} cannot be read ({exc}); --fresh starts the repetitions over") from None
