"""Stopping rules: end a run before --rounds once its evaluation says it is done (or stuck).

Judged after every round that evaluates, on the run's evaluated rounds so far:
- `--target-accuracy A`: accuracy reached A;
- `--target-loss L`: evaluation loss fell to L or below;
- `--patience N --min-delta D`: the best accuracy of the last N evaluated rounds beats the best
  before them by less than D (convergence, or a run that stopped learning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StoppingRules:
    target_accuracy: float = 0.0
    """0: off."""
    target_loss: float = 0.0
    """0: off."""
    patience: int = 0
    """Evaluated rounds the accuracy has to improve over; 0: off."""
    min_delta: float = 0.0
    """Improvement of the best accuracy over `patience` evaluated rounds below which the run stops."""

    def problems(self) -> list[str]:
        checks = [
            (0 <= self.target_accuracy <= 1, "--target-accuracy must be in [0, 1] (0: off)"),
            (self.target_loss >= 0 and math.isfinite(self.target_loss), "--target-loss cannot be negative (0: off)"),
            (self.patience >= 0, "--patience cannot be negative (0: off)"),
            (self.min_delta >= 0 and math.isfinite(self.min_delta), "--min-delta cannot be negative"),
        ]
        return [message for ok, message in checks if not ok]


@dataclass
class StoppingJudge:
    """Keeps a run's evaluated rounds and says when a rule ends the run."""

    rules: StoppingRules
    history: list[tuple[int, float, float]] = field(default_factory=list)
    """(round, loss, accuracy) of every evaluated round, in order."""

    def judge(self, round_: int, loss: float, accuracy: float) -> str:
        """Record an evaluated round; the reason the run stops after it, or empty."""
        if not (math.isfinite(loss) and math.isfinite(accuracy)):
            return ""
        self.history.append((round_, loss, accuracy))
        rules = self.rules
        if rules.target_accuracy > 0 and accuracy >= rules.target_accuracy:
            return f"reached --target-accuracy {rules.target_accuracy:g}: accuracy {accuracy:.4f} in round {round_}"
        if rules.target_loss > 0 and loss <= rules.target_loss:
            return f"reached --target-loss {rules.target_loss:g}: loss {loss:.4f} in round {round_}"
        if rules.patience > 0 and len(self.history) > rules.patience:
            before = max(a for _, _, a in self.history[: -rules.patience])
            recent = max(a for _, _, a in self.history[-rules.patience :])
            improved = recent - before
            if improved < rules.min_delta or improved <= 0:
                return (
                    f"converged: the best accuracy rose by {improved:+.4f} over the last {rules.patience} "
                    f"evaluated rounds (--patience {rules.patience}, --min-delta {rules.min_delta:g})"
                )
        return ""
