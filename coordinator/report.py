"""Progress while rounds run, and the summary at the end (stdout; logs go to stderr).

On a terminal the progress is drawn in place (`coordinator.console`); elsewhere (a pipe, a file)
it is plain lines: one when a phase asks sites, one when a site answers, one per round.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from coordinator.console import LiveDisplay, can_draw
from coordinator.progress import RunProgress


def _num(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None and math.isfinite(value) else "-"


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class Report:
    def __init__(self, total_rounds: int, stream: TextIO = sys.stdout) -> None:
        self.total_rounds = total_rounds
        self.stream = stream
        self._display: LiveDisplay | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def say(self, message: str) -> None:
        if self._display is not None:
            self._display.print(message)
        else:
            print(message, file=self.stream, flush=True)

    def watch(self, progress: RunProgress) -> None:
        """Show `progress` as the run goes, until close() or the next watch(); call it on the event loop that runs the run."""
        self.close()
        if can_draw(self.stream):
            self._display = LiveDisplay(self.stream, progress)
            self._display.start()
        else:
            self._unsubscribe = progress.subscribe(lambda event: self._plain(progress, event))

    def close(self) -> None:
        """Stop showing progress; the report's lines stay."""
        if self._display is not None:
            self._display.stop()
            self._display = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _label(self, round_: int) -> str:
        return "initial" if round_ == 0 else f"round {round_}/{self.total_rounds}"

    def _plain(self, progress: RunProgress, event: dict[str, Any]) -> None:
        """A line for a phase that asks sites, and one for each answer; step reports are left out."""
        label = f"{self._label(progress.round):>14}"
        if event["kind"] == "phase" and event["sites"]:
            sites = _plural(len(event["sites"]), "site")
            if event["phase"] == "train":
                steps = progress.sites[event["sites"][0]].steps
                self.say(f"{label}  train: {sites}, {_plural(steps, 'local step')} each")
            else:
                self.say(f"{label}  {event['phase']}: {sites}")
        elif event["kind"] == "answered":
            site, phase, status = progress.sites[event["site"]], event["phase"], event["status"]
            if phase == "train" and status == "accepted":
                loss = _num(site.loss, ".4f")
                self.say(f"{label}  {site.name} trained {site.step}/{site.steps} steps, loss {loss} (accepted)")
            else:
                why = f": {event['reason']}" if event["reason"] else ""
                self.say(f"{label}  {site.name} {phase} {status}{why}")

    def round_done(self, row: dict[str, Any]) -> None:
        label = self._label(row["round"])
        trainers = f"trainers {row['trainers_accepted']}/{row['trainers_sampled']}" if row["round"] else "evaluation"
        self.say(
            f"{label:>14}  loss {_num(row['loss'], '.4f')}  accuracy {_num(row['accuracy'], '.3f')}  "
            f"{trainers}  {row['seconds']:.1f} s  sent {_mb(row['bytes_sent'])}  received {_mb(row['bytes_received'])}"
            + (f"  ε {row['dp_epsilon']:.3g}" if "dp_epsilon" in row else "")
            + (f"  clip {row['clip_norm']:.3g}" if "clip_norm" in row else "")
            + ("  FAILED" if row["status"] != "ok" else "")
        )

    def summary(
        self,
        rows: Sequence[dict[str, Any]],
        out: str,
        wall_seconds: float,
        stop_reason: str = "",
        logs: bool = False,
        first_round: int = 1,
    ) -> None:
        """The end of a run; `first_round`: the first round this process ran (after a resume, not 1)."""
        trained = [r for r in rows if r["round"] > 0]
        if not rows:
            return
        first, last = rows[0], rows[-1]
        here = [r for r in trained if r["round"] >= first_round and r["status"] == "ok"]
        per_round = sum(r["seconds"] for r in here) / len(here) if here else 0.0
        trainer_rounds = sum(r["trainers_sampled"] for r in trained) or 1
        self.say("")
        if first_round == 1:
            self.say(f"Finished {len(here)} rounds in {wall_seconds:.1f} s ({per_round:.1f} s per round).")
        elif here:
            self.say(
                f"Finished rounds {first_round}-{here[-1]['round']} in {wall_seconds:.1f} s ({per_round:.1f} s per round); "
                f"rounds 1-{first_round - 1} ran before the resume."
            )
        else:
            self.say(f"Nothing was left to run: rounds 1-{first_round - 1} finished before.")
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
