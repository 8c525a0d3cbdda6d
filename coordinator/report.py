"""Progress lines while rounds run, and the summary at the end (stdout; logs go to stderr)."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any, TextIO


def _num(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None and math.isfinite(value) else "-"


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB"


class Report:
    def __init__(self, total_rounds: int, stream: TextIO = sys.stdout) -> None:
        self.total_rounds = total_rounds
        self.stream = stream

    def say(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def round_done(self, row: dict[str, Any]) -> None:
        label = "initial" if row["round"] == 0 else f"round {row['round']}/{self.total_rounds}"
        trainers = f"trainers {row['trainers_accepted']}/{row['trainers_sampled']}" if row["round"] else "evaluation"
        self.say(
            f"{label:>14}  loss {_num(row['loss'], '.4f')}  accuracy {_num(row['accuracy'], '.3f')}  "
            f"{trainers}  {row['seconds']:.1f} s  sent {_mb(row['bytes_sent'])}  received {_mb(row['bytes_received'])}"
            + (f"  ε {row['dp_epsilon']:.3g}" if "dp_epsilon" in row else "")
            + (f"  clip {row['clip_norm']:.3g}" if "clip_norm" in row else "")
            + ("  FAILED" if row["status"] != "ok" else "")
        )

    def summary(
        self, rows: Sequence[dict[str, Any]], out: str, wall_seconds: float, stop_reason: str = "", logs: bool = False
    ) -> None:
        trained = [r for r in rows if r["round"] > 0]
        if not rows:
            return
        first, last = rows[0], rows[-1]
        per_round = sum(r["seconds"] for r in trained) / len(trained) if trained else 0.0
        trainer_rounds = sum(r["trainers_sampled"] for r in trained) or 1
        self.say("")
        self.say(f"Finished {len(trained)} rounds in {wall_seconds:.1f} s ({per_round:.1f} s per round).")
        if stop_reason:
            self.say(f"  stopped early: {stop_reason}")
        if "dp_epsilon" in last:
            self.say(f"  differential privacy: ε = {last['dp_epsilon']:.4g} spent by the run")
        self.say(
            f"  evaluation loss {_num(first['loss'], '.4f')} -> {_num(last['loss'], '.4f')}, "
            f"accuracy {_num(first['accuracy'], '.3f')} -> {_num(last['accuracy'], '.3f')}"
        )
        if trained:
            sent = sum(r["bytes_sent"] for r in trained) / trainer_rounds
            received = sum(r["bytes_received"] for r in trained) / trainer_rounds
            raw = trained[-1]["adapter_bytes"]
            self.say(
                f"  per trainer per round: sent {_mb(int(sent))}, received {_mb(int(received))} "
                f"(raw adapter {_mb(raw)}; train and evaluate calls together)"
            )
        self.say(f"  outputs in {out}: metrics.jsonl, plot.png, adapter/ (PEFT), checkpoints/" + (", logs/" if logs else ""))
