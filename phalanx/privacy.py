"""Site-level differential privacy for federated rounds (DP-FedAvg, McMahan et al. 2018).

The mechanism, once per round, at the coordinator:
1. each accepted site's update (its reply minus the global adapter) is clipped to L2 norm C;
2. the clipped updates are summed with weight 1 each: weights are uniform, so one site's
   influence is bounded by C whatever its data size or the example count it claims;
3. Gaussian noise of standard deviation z·C is added to every coordinate of the sum;
4. the sum is divided by the number of sites sampled for the round, fixed before any reply
   arrives (a site that fails counts as a zero update), and added to the global adapter.

The unit of privacy is a site's whole data set, under replace-one adjacency: the federation's
sites are known, and a neighbouring federation has one site's data replaced by anything. Two
updates in the C-ball are at most 2C apart, so the sum's sensitivity is 2C and a round is a
Gaussian mechanism with noise multiplier z/2 relative to it. The coordinator samples m of the n
live sites without replacement, so each round is
`SampledWithoutReplacementDpEvent(n, m, GaussianDpEvent(z / 2))` (a plain `GaussianDpEvent`
when every site is sampled), composed over rounds by `dp_accounting`'s RDP accountant; ε is
reported for the run's δ. When every round samples every site, the PLD accountant may be used
instead (`accountant="pld"`): it is exact up to discretisation, so its ε is a little tighter.
It has no event for sampling without replacement, so it takes only such runs; as the Gaussian's
sensitivity is already folded into z/2, PLD gets it under add-or-remove neighbours (RDP's
Gaussian does not depend on the relation). What the mechanism covers is the adapter:
evaluation metrics that sites report are released as they are.

Adaptive clipping (Andrew et al. 2019, `AdaptiveClip`): instead of a fixed C, the clip norm
follows a target quantile γ of the sites' update norms. Each round also releases the number of
sites whose update was within C, with Gaussian noise σ_b, and C moves geometrically towards the
quantile: C ← C·exp(-η(b̃ - γ)), b̃ the noisy fraction. The count has sensitivity 1 under
replace-one, so the round, update sum and count together, is a Gaussian mechanism with noise
multiplier z/2 (the one accounted) when the update sum gets noise z_Δ·C with
z_Δ = (z⁻² - (2σ_b)⁻²)^(-1/2): a little more noise on the updates pays for the count.

Noise comes from a cryptographic stream (ChaCha20, keyed from the operating system's random
source for every draw), turned into normal deviates by the Box-Muller transform, never from
numpy's generator: its state would predict the noise.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import dp_accounting
import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["AdaptiveClip", "PrivacyLedger", "gaussian_noise", "round_event"]

_UNIT = 2.0**-53
MAX_NOISE_MULTIPLIER = 1e4
"""Calibration searches below this; a budget that even this much noise cannot meet is refused."""


def _uniform_bits(count: int) -> np.ndarray:
    """`count` uniformly random 64-bit words from a freshly keyed ChaCha20 stream."""
    cipher = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None)
    return np.frombuffer(cipher.encryptor().update(bytes(8 * count)), dtype=np.uint64)


def gaussian_noise(size: int, std: float) -> np.ndarray:
    """`size` independent N(0, std²) float64 deviates from a cryptographic stream (Box-Muller)."""
    pairs = (size + 1) // 2
    words = _uniform_bits(2 * pairs).reshape(2, pairs)
    u1 = ((words[0] >> np.uint64(11)).astype(np.float64) + 1.0) * _UNIT  # (0, 1]: log is finite
    u2 = (words[1] >> np.uint64(11)).astype(np.float64) * _UNIT
    radius = np.sqrt(-2.0 * np.log(u1)) * std
    angle = 2.0 * math.pi * u2
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size]


def round_event(noise_multiplier: float, live: int, sampled: int) -> dp_accounting.DpEvent:
    """The DP event of one round: `sampled` of `live` sites, noise z·C on a sum of sensitivity 2C."""
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2.0)
    if sampled >= live:
        return gaussian
    return dp_accounting.SampledWithoutReplacementDpEvent(live, sampled, gaussian)


ACCOUNTANTS = ("rdp", "pld")
PLD_INTERVAL = 1e-3
"""PLD's discretisation of the privacy loss: the estimate stays pessimistic, and at 1e-3 it is within
1e-8 of the default 1e-4's at a seventeenth of the time."""


def _accountant(kind: str = "rdp") -> dp_accounting.PrivacyAccountant:
    """RDP at dp_accounting's default orders, replace-one neighbours (needed for sampling without
    replacement); or PLD for rounds that sample every site (see the module's docstring)."""
    relation = dp_accounting.privacy_accountant.NeighboringRelation
    if kind == "pld":
        return dp_accounting.pld.PLDAccountant(
            neighboring_relation=relation.ADD_OR_REMOVE_ONE, value_discretization_interval=PLD_INTERVAL
        )
    if kind != "rdp":
        raise ValueError(f"unknown accountant {kind!r}; choose from {', '.join(ACCOUNTANTS)}")
    return dp_accounting.rdp.RdpAccountant(neighboring_relation=relation.REPLACE_ONE)


def _composed(rounds: Sequence[Round]) -> dp_accounting.DpEvent:
    """All `rounds` as one event; equal rounds self-composed, so each kind is computed once."""
    counts = Counter(rounds)
    return dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(round_event(z, live, sampled), n) for (live, sampled, z), n in counts.items()]
    )


Round = tuple[int, int, float]
"""One released round: live sites, sites sampled, noise multiplier."""


@dataclass
class PrivacyLedger:
    """The rounds released so far and the ε they spend at `delta`.

    Its `rounds` go into checkpoints, so a resumed run goes on spending from the same budget,
    and each keeps its own noise multiplier.
    """

    noise_multiplier: float
    """The noise multiplier of the rounds to come."""
    delta: float
    rounds: list[Round]
    accountant: str = "rdp"
    """"rdp", or "pld" for runs whose rounds all sample every site."""

    def epsilon(self, then: tuple[int, int] | None = None) -> float:
        """ε after the recorded rounds, and after one more of (live, sampled) sites if `then` is given."""
        return _epsilon([*self.rounds, *([(*then, self.noise_multiplier)] if then else [])], self.delta, self.accountant)

    def record(self, live: int, sampled: int) -> None:
        """Record a released round: `sampled` of `live` sites trained, and the noised aggregate replaced the adapter."""
        self.rounds.append((live, sampled, self.noise_multiplier))

    def calibrate(self, target_epsilon: float, rounds: Sequence[tuple[int, int]]) -> float:
        """Set and return the smallest noise multiplier with which `rounds` more of (live, sampled) sites
        keep ε within `target_epsilon`."""

        def planned(z: float) -> list[Round]:
            return [*self.rounds, *((live, sampled, z) for live, sampled in rounds)]

        floor = _epsilon(planned(MAX_NOISE_MULTIPLIER), self.delta, self.accountant)
        if floor > target_epsilon:
            raise ValueError(
                f"no noise meets ε = {target_epsilon:g}: the rounds released so far, with as much noise as "
                f"{MAX_NOISE_MULTIPLIER:g} for the rest, already spend {floor:.4g}"
            )
        self.noise_multiplier = self._search("rdp", planned, target_epsilon, dp_accounting.LowerEndpointAndGuess(0.05, 1.0))
        if self.accountant == "pld":
            # PLD is the tighter bound, so its z lies below RDP's; RDP's is quick to find and brackets the slow search.
            bracket = dp_accounting.ExplicitBracketInterval(self.noise_multiplier / 2, self.noise_multiplier)
            self.noise_multiplier = self._search("pld", planned, target_epsilon, bracket)
        return self.noise_multiplier

    def _search(
        self,
        kind: str,
        planned: Callable[[float], list[Round]],
        target_epsilon: float,
        bracket: dp_accounting.mechanism_calibration.BracketInterval,
    ) -> float:
        return float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: _accountant(kind), lambda z: _composed(planned(z)), target_epsilon, self.delta, bracket, tol=1e-4
            )
        )

    def to_metadata(self) -> dict[str, str]:
        """The released rounds as checkpoint metadata (a string)."""
        return {"dp_rounds": json.dumps(self.rounds)}

    def resume(self, metadata: Mapping[str, str]) -> None:
        """Take the released rounds from a checkpoint's metadata, if it has any."""
        if "dp_rounds" in metadata:
            self.rounds = [(int(live), int(sampled), float(z)) for live, sampled, z in json.loads(metadata["dp_rounds"])]


def _epsilon(rounds: Sequence[Round], delta: float, kind: str = "rdp") -> float:
    accountant = _accountant(kind)
    event = _composed(rounds)
    if not accountant.supports(event):
        raise ValueError(f"the {kind} accountant cannot account these rounds (sampling without replacement needs rdp)")
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


@dataclass
class AdaptiveClip:
    """The clip norm of the rounds to come, moved towards a quantile of the update norms each round."""

    norm: float
    """C for the next round; it starts at --clip-norm."""
    quantile: float = 0.5
    learning_rate: float = 0.2
    count_std: float = 0.0
    """σ_b, the noise on the count of unclipped updates; 0 takes `default_count_std` of the round's sites."""

    def noise(self, noise_multiplier: float, sampled: int) -> tuple[float, float]:
        """(z_Δ, σ_b) for a round of `sampled` sites whose whole release must have noise multiplier z."""
        count_std = self.count_std or default_count_std(noise_multiplier, sampled)
        if 2 * count_std <= noise_multiplier:
            raise ValueError(
                f"the clipped-count noise {count_std:g} must exceed half the noise multiplier {noise_multiplier:g}"
            )
        return (noise_multiplier**-2 - (2 * count_std) ** -2) ** -0.5, count_std

    def noisy_fraction(self, unclipped: int, sampled: int, count_std: float) -> float:
        """The released share of the `sampled` sites whose update was within C (noise σ_b on the count)."""
        return (unclipped + float(gaussian_noise(1, count_std)[0])) / sampled

    def step(self, fraction: float) -> None:
        """Move C after a released round whose noisy unclipped fraction was `fraction`."""
        self.norm *= math.exp(-self.learning_rate * (fraction - self.quantile))

    def to_metadata(self) -> dict[str, str]:
        return {"dp_clip_norm": repr(self.norm)}

    def resume(self, metadata: Mapping[str, str]) -> None:
        if "dp_clip_norm" in metadata:
            self.norm = float(metadata["dp_clip_norm"])


def default_count_std(noise_multiplier: float, sampled: int) -> float:
    """σ_b = m/20 as Andrew et al. advise, but at least z, so the updates' noise grows by 15% at most."""
    return max(sampled / 20, noise_multiplier)
