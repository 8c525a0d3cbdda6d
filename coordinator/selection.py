"""Which trainers a round asks to train: a uniform draw, a resource-aware draw or a performance-aware choice.

`select` is pure: given the candidates, the number of slots, the policy and a seeded `random.Random`
(and, for the performance policy, a `PerformanceTracker`), it always makes the same choice, and says
why each site was chosen or could not be.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SELECTIONS = ("uniform", "resource", "performance")

_GB = 1e9
_MIN_SECONDS = 1e-3
"""Train times are floored here so that a near-instant round does not make a score unbounded."""


@dataclass(frozen=True)
class SiteCapabilities:
    """What a site reports about itself; zero (or "") means not reported."""

    cores: int = 0
    memory_bytes: int = 0
    accelerator: str = ""
    """"" for none, else e.g. "cuda:NVIDIA H200" or "mps"."""
    examples: int = 0
    """Training examples."""


@dataclass(frozen=True)
class Candidate:
    name: str
    """The site's name, unique among the candidates."""
    capabilities: SiteCapabilities = field(default_factory=SiteCapabilities)


@dataclass(frozen=True)
class SelectionConfig:
    policy: str = "uniform"
    min_cores: int = 0
    """Resource and performance: skip sites reporting fewer cores (unreported is below any positive count)."""
    min_memory_gb: float = 0.0
    """Resource and performance: skip sites reporting less memory, in 10^9 bytes (unreported is none)."""
    explore: float = 0.1
    """Performance: the share of the slots drawn uniformly from the sites not ranked best."""

    def __post_init__(self) -> None:
        if self.policy not in SELECTIONS:
            raise ValueError(f"--selection must be one of {', '.join(SELECTIONS)}, not {self.policy!r}")
        if self.min_cores < 0:
            raise ValueError(f"--selection-min-cores must be >= 0, not {self.min_cores}")
        if not (math.isfinite(self.min_memory_gb) and self.min_memory_gb >= 0):
            raise ValueError(
                f"--selection-min-memory-gb must be a finite number >= 0, not {self.min_memory_gb}"
            )
        if not 0 <= self.explore < 1:
            raise ValueError(f"--selection-explore must be in [0, 1), not {self.explore}")
        if self.policy == "uniform" and self.has_thresholds:
            flag = "--selection-min-cores" if self.min_cores else "--selection-min-memory-gb"
            raise ValueError(f"{flag} needs --selection resource or performance")

    @property
    def has_thresholds(self) -> bool:
        return self.min_cores > 0 or self.min_memory_gb > 0


@dataclass(frozen=True)
class Selection:
    chosen: list[str]
    """Sorted by name."""
    skipped: dict[str, str]
    """Site -> why it could not be chosen (below a resource threshold)."""
    reasons: dict[str, str]
    """Chosen site -> why it was chosen."""

    def to_row(self, policy: str) -> dict[str, Any]:
        """A JSON-ready record of this selection."""
        return {
            "policy": policy,
            "chosen": list(self.chosen),
            "skipped": [{"site": site, "reason": self.skipped[site]} for site in sorted(self.skipped)],
            "reasons": {site: self.reasons[site] for site in self.chosen},
        }


@dataclass
class _History:
    seconds: float
    alignment: float
    rounds: int


class PerformanceTracker:
    """Per site: an exponential moving average of its train seconds and of how much its update helped.

    Each record moves an average `smoothing` of the way to the new value (the first record sets it).
    A site's score is `(1 + alignment) / 2 * median_seconds / seconds`: the help of its updates in
    [0, 1] (1 when they point where the aggregate went, 0 when opposite) times its speed relative to
    the median of all recorded sites (2 when twice as fast). Higher is better.
    """

    def __init__(self, smoothing: float = 0.5) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], not {smoothing}")
        self.smoothing = smoothing
        self._sites: dict[str, _History] = {}

    def record(self, site: str, seconds: float, alignment: float) -> None:
        """One round's train seconds and update alignment (cosine with the aggregate update, in [-1, 1]).

        A record with a non-finite value or negative seconds measures nothing and is ignored.
        """
        if not (math.isfinite(seconds) and math.isfinite(alignment)) or seconds < 0:
            return
        alignment = min(1.0, max(-1.0, alignment))
        history = self._sites.get(site)
        if history is None:
            self._sites[site] = _History(seconds, alignment, 1)
            return
        history.seconds += self.smoothing * (seconds - history.seconds)
        history.alignment += self.smoothing * (alignment - history.alignment)
        history.rounds += 1

    def seconds(self, site: str) -> float | None:
        history = self._sites.get(site)
        return None if history is None else history.seconds

    def alignment(self, site: str) -> float | None:
        history = self._sites.get(site)
        return None if history is None else history.alignment

    def score(self, site: str) -> float | None:
        """None when `site` was never recorded; see the class docstring for the formula."""
        return self.scores().get(site)

    def scores(self) -> dict[str, float]:
        """Every recorded site's score."""
        if not self._sites:
            return {}
        median = statistics.median(max(h.seconds, _MIN_SECONDS) for h in self._sites.values())
        return {
            site: (1 + h.alignment) / 2 * median / max(h.seconds, _MIN_SECONDS)
            for site, h in self._sites.items()
        }

    def describe(self, site: str) -> str:
        history = self._sites.get(site)
        if history is None:
            return "not measured yet"
        return (
            f"ema {history.seconds:.1f} s, alignment {history.alignment:.2f}, "
            f"score {self.score(site):.2f} over {history.rounds} round{'s' if history.rounds != 1 else ''}"
        )

    def to_state(self) -> dict[str, dict[str, float]]:
        """JSON-able history, for `from_state` when a run resumes."""
        return {
            site: {"seconds": h.seconds, "alignment": h.alignment, "rounds": h.rounds}
            for site, h in sorted(self._sites.items())
        }

    @classmethod
    def from_state(
        cls, state: Mapping[str, Mapping[str, float]], smoothing: float = 0.5
    ) -> PerformanceTracker:
        tracker = cls(smoothing)
        for site, values in state.items():
            try:
                seconds, alignment, rounds = (
                    float(values["seconds"]),
                    float(values["alignment"]),
                    int(values["rounds"]),
                )
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"performance history of {site!r} is malformed: {e}") from e
            if not (math.isfinite(seconds) and seconds >= 0 and -1 <= alignment <= 1 and rounds >= 1):
                raise ValueError(f"performance history of {site!r} is out of range: {dict(values)}")
            tracker._sites[site] = _History(seconds, alignment, rounds)
        return tracker


def update_alignment(update: Mapping[str, np.ndarray], aggregate_update: Mapping[str, np.ndarray]) -> float:
    """The cosine similarity of two updates over all their tensors (in float64); 0.0 when either is zero."""
    if update.keys() != aggregate_update.keys():
        raise ValueError(f"updates differ in keys: {sorted(update.keys() ^ aggregate_update.keys())}")
    dot = norm_a = norm_b = 0.0
    for key, a in update.items():
        b = aggregate_update[key]
        if np.shape(a) != np.shape(b):
            raise ValueError(f"updates differ in the shape of {key!r}: {np.shape(a)} vs {np.shape(b)}")
        x = np.asarray(a, dtype=np.float64).ravel()
        y = np.asarray(b, dtype=np.float64).ravel()
        dot += float(x @ y)
        norm_a += float(x @ x)
        norm_b += float(y @ y)
    if norm_a == 0 or norm_b == 0:
        return 0.0
    return min(1.0, max(-1.0, dot / math.sqrt(norm_a * norm_b)))


def _shortfall(capabilities: SiteCapabilities, config: SelectionConfig) -> str | None:
    """Why a site is below the resource thresholds, or None when it meets them."""
    reasons = []
    if capabilities.cores < config.min_cores:
        have = f"{capabilities.cores} cores" if capabilities.cores else "cores not reported"
        reasons.append(f"{have} < --selection-min-cores {config.min_cores}")
    if capabilities.memory_bytes < config.min_memory_gb * _GB:
        gb = capabilities.memory_bytes / _GB
        have = f"{gb:.3g} GB memory" if capabilities.memory_bytes else "memory not reported"
        reasons.append(f"{have} < --selection-min-memory-gb {config.min_memory_gb:g}")
    return "; ".join(reasons) or None


def _explore_slots(n: int, explore: float, rng: random.Random) -> int:
    """Exploration slots out of `n`: `explore * n` rounded, at least 1 and at most n - 1 when n >= 2.

    With one slot it is an exploration with probability `explore`.
    """
    if explore == 0 or n == 0:
        return 0
    if n == 1:
        return int(rng.random() < explore)
    return min(n - 1, max(1, math.floor(explore * n + 0.5)))


def _performance(
    eligible: list[Candidate],
    n: int,
    config: SelectionConfig,
    rng: random.Random,
    tracker: PerformanceTracker,
) -> dict[str, str]:
    scores = tracker.scores()
    if not any(c.name in scores for c in eligible):
        return {c.name: "no history yet: uniform draw" for c in rng.sample(eligible, n)}
    ranked = sorted((c.name for c in eligible if c.name in scores), key=lambda name: (-scores[name], name))
    n_explore = _explore_slots(n, config.explore, rng) if len(eligible) > n else 0
    n_best = min(n - n_explore, len(ranked))
    reasons = {name: f"top score ({tracker.describe(name)})" for name in ranked[:n_best]}
    # The rest are drawn uniformly, sites never measured first, so new and slow sites still get measured.
    unscored = [c.name for c in eligible if c.name not in scores]
    others = ranked[n_best:]
    drawn = rng.sample(unscored, min(n - n_best, len(unscored)))
    drawn += rng.sample(others, n - n_best - len(drawn))
    reasons.update({name: f"exploration ({tracker.describe(name)})" for name in drawn})
    return reasons


def select(
    candidates: Sequence[Candidate],
    k: int,
    config: SelectionConfig,
    rng: random.Random,
    tracker: PerformanceTracker | None = None,
) -> Selection:
    """Choose up to `k` of `candidates` by `config.policy`, drawing with `rng`.

    uniform: `rng.sample` over the candidates in their given order (the draw rounds always made).
    resource: skip sites below the thresholds, then draw uniformly among the rest (all, if fewer than `k`).
    performance: skip as for resource, then fill the slots with the best-scoring sites of `tracker`,
    but for a share `config.explore` drawn uniformly from the others; a uniform draw while nobody has a score.
    """
    if k < 0:
        raise ValueError(f"cannot select {k} sites")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(
            f"candidate names are not unique: {sorted({name for name in names if names.count(name) > 1})}"
        )
    skipped: dict[str, str] = {}
    eligible = list(candidates)
    if config.policy != "uniform" and config.has_thresholds:
        for c in candidates:
            if (reason := _shortfall(c.capabilities, config)) is not None:
                skipped[c.name] = reason
        eligible = [c for c in candidates if c.name not in skipped]
    n = min(k, len(eligible))
    if config.policy == "uniform":
        reasons = {c.name: "uniform draw" for c in rng.sample(eligible, n)}
    elif config.policy == "resource":
        reasons = {c.name: "meets resources" for c in rng.sample(eligible, n)}
    else:
        reasons = _performance(eligible, n, config, rng, tracker or PerformanceTracker())
    chosen = sorted(reasons)
    return Selection(chosen=chosen, skipped=skipped, reasons={name: reasons[name] for name in chosen})
