"""Stopping rules: target accuracy, target loss and convergence end a run at the right round."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from coordinator.outputs import RunOutputs
from coordinator.run_config import RunConfigError, parse_run_toml, round_config
from coordinator.stopping import StoppingJudge, StoppingRules
from tests.harness import start_coordinator, start_echo_site, stop_sites
from trainer.echo import EchoLearner, synthetic_adapter
from trainer.jobs import EvalOutcome

# Accuracy and loss the sites report in rounds 0, 1, 2, ...
ACCURACY = [0.30, 0.50, 0.62, 0.70, 0.71, 0.712, 0.713, 0.80]
LOSS = [1.10, 0.90, 0.80, 0.74, 0.70, 0.69, 0.68, 0.60]


class ScriptedEcho(EchoLearner):
    """An echo learner whose n-th evaluation reports the n-th scripted accuracy and loss."""

    def __init__(self) -> None:
        super().__init__(synthetic_adapter(1_000))
        self.evaluations = 0

    def evaluate(self, adapter: Mapping[str, np.ndarray], **kwargs) -> EvalOutcome:
        n, self.evaluations = self.evaluations, self.evaluations + 1
        return EvalOutcome(loss=LOSS[n], accuracy=ACCURACY[n], num_examples=20, seconds=0.0)


def judged(rules: StoppingRules) -> tuple[int, str]:
    """The round a rule stops the scripted run after (rounds > 0), and why; (-1, "") if none does."""
    judge = StoppingJudge(rules)
    for round_, (loss, accuracy) in enumerate(zip(LOSS, ACCURACY, strict=True)):
        reason = judge.judge(round_, loss, accuracy)
        if reason and round_ > 0:
            return round_, reason
    return -1, ""


@pytest.mark.parametrize(
    ("rules", "round_", "says"),
    [
        (StoppingRules(target_accuracy=0.7), 3, "reached --target-accuracy 0.7: accuracy 0.7000 in round 3"),
        (StoppingRules(target_loss=0.75), 3, "reached --target-loss 0.75: loss 0.7400 in round 3"),
        (StoppingRules(patience=2, min_delta=0.02), 5, "rose by +0.0120 over the last 2"),
        (StoppingRules(patience=3, min_delta=0.02), 6, "rose by +0.0130 over the last 3"),
        (StoppingRules(), -1, ""),
        (StoppingRules(target_accuracy=0.9), -1, ""),
    ],
)
def test_each_rule_stops_after_the_round_it_names(rules: StoppingRules, round_: int, says: str) -> None:
    stopped, reason = judged(rules)
    assert stopped == round_
    assert says in reason


def test_patience_without_min_delta_stops_when_accuracy_does_not_improve_at_all() -> None:
    judge = StoppingJudge(StoppingRules(patience=2))
    reasons = [judge.judge(r, 1.0, a) for r, a in enumerate([0.5, 0.6, 0.6, 0.6])]
    assert reasons[:3] == ["", "", ""] and "rose by +0.0000" in reasons[3]


def test_rules_out_of_range_are_refused_by_name() -> None:
    for text, flag in [
        ("target-accuracy = 1.5", "--target-accuracy"),
        ("target-loss = -1.0", "--target-loss"),
        ("patience = -2", "--patience"),
        ("min-delta = -0.1", "--min-delta"),
    ]:
        with pytest.raises(RunConfigError, match=flag):
            parse_run_toml(text, can_sign=False)
    args = parse_run_toml("target-accuracy = 0.7\npatience = 3\nmin-delta = 0.01\n", can_sign=False)
    assert round_config(args).stopping == StoppingRules(0.7, 0.0, 3, 0.01)


# With --evaluate-every 2 the scripted figures fall on rounds 0, 2, 4, ...: loss 0.80 comes in round 4.
@pytest.mark.parametrize(
    ("rules", "every", "last"),
    [(StoppingRules(target_accuracy=0.7), 1, 3), (StoppingRules(patience=2, min_delta=0.02), 1, 5), (StoppingRules(target_loss=0.8), 2, 4)],
)
async def test_a_run_stops_at_the_rule_round_and_says_why_in_row_span_and_checkpoint(
    tmp_path: Path, rules: StoppingRules, every: int, last: int
) -> None:
    coordinator = await start_coordinator(tmp_path, rounds=7, stopping=rules, evaluate_every=every)
    sites = [await start_echo_site(coordinator.address, k, learner=ScriptedEcho()) for k in range(2)]
    try:
        rows = await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        await coordinator.close()
    assert rows[-1]["round"] == last
    reason = coordinator.app.run.stop_reason
    assert reason and rows[-1]["stop_reason"] == reason
    assert all("stop_reason" not in r for r in rows[:-1])
    span = next(
        s for s in coordinator.spans.get_finished_spans() if s.name == "fl.round" and s.attributes["fl.round"] == last
    )
    assert span.attributes["fl.stop_reason"] == reason
    checkpoint = RunOutputs(tmp_path).load_latest_checkpoint()
    assert checkpoint is not None and checkpoint.round == last  # the round that met the rule is kept
    assert coordinator.app.run.completed_rounds == last


async def test_a_resumed_run_judges_the_rounds_before_the_resume_too(tmp_path: Path) -> None:
    """Patience 2 stops the scripted run after round 5 whether or not it was resumed after round 3."""
    coordinator = await start_coordinator(tmp_path, rounds=7, stopping=StoppingRules(patience=2, min_delta=0.02))
    app = coordinator.app
    earlier = [{"round": r, "status": "ok", "loss": LOSS[r], "accuracy": ACCURACY[r]} for r in range(4)]
    app.next_run(app.config.run, RunOutputs(tmp_path), coordinator.initial, run_id="run-1", start_round=4).replay(earlier)
    learners = [ScriptedEcho() for _ in range(2)]
    for learner in learners:
        learner.evaluations = 4  # the scripted figures go on from round 4
    sites = [await start_echo_site(coordinator.address, k, learner=learner) for k, learner in enumerate(learners)]
    try:
        rows = await app.execute()
    finally:
        await stop_sites(sites)
        await coordinator.close()
    assert [r["round"] for r in rows] == [4, 5]
    assert "rose by +0.0120 over the last 2" in rows[-1]["stop_reason"]
