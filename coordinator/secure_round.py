"""What a securely aggregated round needs besides the protocol: its settings, and the update it yields.

The masked sum the coordinator recovers is Σ wᵢ·uᵢ over the surviving sites, where uᵢ is a
site's update (its adapter minus the global one, clipped to `clip_range` per coordinate) and wᵢ
its weight share (its weight over the sum of the sampled sites' weights). Without DP the new
global adapter is global + Σ wᵢ·uᵢ / Σ wᵢ (FedAvg over the survivors); with DP every wᵢ is
1/m for m sites sampled, each site adds its share of the noise, and the new adapter is
global + Σ wᵢ·uᵢ, as DP-FedAvg divides by the number sampled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from coordinator.config import RoundConfig
from phalanx.codec import Adapter
from phalanx.secagg.graph import default_neighbours, default_threshold

DEFAULT_RANGE = 1.0
"""The clipping range of an update's coordinates when nothing bounds them (no --clip-norm)."""
NOISE_TAIL = 10.0
"""Range above the clip norm, in per-site noise deviations: a coordinate passes it with probability < 1e-22."""


@dataclass(frozen=True)
class SecureSettings:
    neighbours: int
    threshold: int
    min_survivors: int
    """Masked inputs needed to unmask: the round fails with fewer (and no site reveals a share)."""
    clip_range: float
    noise_std: float
    """The Gaussian noise each site adds per coordinate: its share of the round's DP noise."""
    count_noise_std: float
    """Under adaptive clipping, each site's share of the noise on the count of unclipped updates."""


def settings_for(
    rounds: RoundConfig, sampled: int, clip_norm: float, noise_std: float, count_noise_std: float = 0.0
) -> SecureSettings:
    """The settings of a round of `sampled` sites, clipped to `clip_norm`, whose sum must carry noise
    of `noise_std` per coordinate (0: none) and, adaptive clipping on, `count_noise_std` on the count.

    Each site adds its noise over √s, where s is the fewest survivors the round accepts, so the sum
    of any s' >= s survivors carries at least the noise asked for. The count travels as one more
    coordinate, scaled by `clip_norm`, so the range covers it too.
    """
    k = rounds.secagg_neighbours or default_neighbours(sampled)
    t = rounds.secagg_threshold or default_threshold(min(k, sampled - 1))
    min_survivors = max(rounds.min_trainers, t)
    site_noise = noise_std / math.sqrt(min_survivors)
    site_count_noise = count_noise_std / math.sqrt(min_survivors)
    tail = NOISE_TAIL * max(site_noise, clip_norm * site_count_noise)
    clip_range = rounds.secagg_range or (clip_norm + tail if clip_norm > 0 else DEFAULT_RANGE)
    return SecureSettings(k, t, min_survivors, clip_range, site_noise, site_count_noise)


def apply_update(reference: Mapping[str, np.ndarray], update: np.ndarray) -> Adapter:
    """reference + update (a flat vector in the reference's key order), as float32 tensors."""
    out: Adapter = {}
    offset = 0
    for name, array in reference.items():
        moved = update[offset : offset + array.size].reshape(array.shape)
        out[name] = (np.asarray(array, dtype=np.float64) + moved).astype(np.float32)
        offset += array.size
    return out
