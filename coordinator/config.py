"""The coordinator's settings, built once in __main__ and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from coordinator.registry import RegistryLimits
from coordinator.selection import SelectionConfig
from coordinator.server_optimizers import ServerOptimizerConfig
from coordinator.stopping import StoppingRules
from coordinator.trainer_client import TRANSFER_FLOOR_SECONDS
from phalanx.codec import DEFAULT_MAX_ADAPTER_BYTES
from phalanx.model import ModelConfig
from phalanx.rpc import TlsCredentials

BATCH_ORDERS = ("grouped", "random")
LORA_VARIANTS = ("standard", "ffa")
"""Spelled as the BatchOrder values of trainer.proto, less their prefix."""


@dataclass(frozen=True)
class RoundConfig:
    """What every round does."""

    rounds: int = 5
    min_trainers: int = 2
    """Wait for this many registered trainers; a round fails with fewer accepted replies."""
    fraction_train: float = 1.0
    """Share of the live trainers sampled for training each round (at least min_trainers)."""
    fraction_evaluate: float = 1.0
    local_steps: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    batch_order: str = "grouped"
    """How trainers batch their data: "grouped" by length (least padding) or "random"."""
    eval_batch_size: int = 64
    eval_max_examples: int = 0
    """Evaluate each trainer on at most this many of its test examples; 0 means all."""
    evaluate_every: int = 1
    """Evaluate rounds 0, N, 2N, ... and always the run's last round."""
    round_timeout: float = 300.0
    """Seconds a trainer has to answer Train or Evaluate before it is left out of the round."""
    aggregator: str = "fedavg"
    trim: float = 0.2
    """Share of values dropped at each end of every coordinate by the trimmed-mean aggregator."""
    clip_norm: float = 0.0
    """Scale each update (reply minus global adapter) down to this L2 norm; 0 turns clipping off."""
    deterministic: bool = False
    """Fold replies in a fixed order, so a rerun gives the same bits (holds every reply until the round ends)."""
    round_retries: int = 0
    """Times a round whose training phase fails is tried again before the run fails."""
    wire_dtype: str = "float32"
    """Element type of adapters on the wire: float32, or float16 / bfloat16 for half the bytes."""
    seed: int = 0
    dp_noise_multiplier: float = 0.0
    """Site-level DP: Gaussian noise of dp_noise_multiplier * clip_norm on the sum of the clipped updates; 0 is off."""
    dp_delta: float = 1e-5
    dp_target_epsilon: float = 0.0
    """Privacy budget at dp_delta: the noise is calibrated to it when dp_noise_multiplier is 0, else the run
    stops before a round that would pass it; 0 sets no budget."""

    server_optimizer: ServerOptimizerConfig = ServerOptimizerConfig()
    """Applied to each round's aggregate as a pseudo-gradient step (Reddi et al. 2021); "none" takes it as is."""
    proximal_mu: float = 0.0
    """FedProx: trainers add mu/2 * ||w - w_global||^2 to their loss; 0 is off."""
    krum_byzantine: int = -1
    """Replies Krum and Multi-Krum tolerate as Byzantine; -1: the most n allows, (n - 3) // 2."""
    multi_krum_keep: int = 0
    """Replies Multi-Krum averages; 0: n - f."""
    lora_variant: str = "standard"
    """"standard" federates both LoRA factors; "ffa" keeps lora_A frozen at values derived from the seed."""
    mixed_ranks: bool = False
    """Sites train at their own LoRA rank; the coordinator averages the products B·A exactly (FlexLoRA)."""
    selection: SelectionConfig = SelectionConfig()
    """How a round picks its trainers: uniform draws, resource thresholds, or performance."""
    stopping: StoppingRules = StoppingRules()
    """Targets and convergence that end the run before its last round."""

    dp_accountant: str = "rdp"
    """"rdp", or "pld" (tighter) for runs that sample every site each round (fraction_train 1)."""
    dp_adaptive_clipping: bool = False
    """Move the clip norm each round towards dp_target_quantile of the update norms (Andrew et al. 2019)."""
    dp_target_quantile: float = 0.5
    dp_clip_lr: float = 0.2
    dp_clipped_count_stddev: float = 0.0
    """Noise on the count of unclipped updates; 0 is max(m/20, z) for m sites sampled."""
    secure_aggregation: bool = False
    """Mask the replies so the coordinator learns only their weighted sum (see phalanx.secagg)."""
    secagg_neighbours: int = 0
    """Neighbours per site in a secure round's graph (k); 0 picks it from the number of sites sampled."""
    secagg_threshold: int = 0
    """Shares needed to recover a site's secret (t); 0 is ⌈2k/3⌉."""
    secagg_range: float = 0.0
    """Each coordinate of an update is clipped to ±range before quantisation; 0 derives it (see SecureSettings)."""

    @property
    def private(self) -> bool:
        """Whether rounds are differentially private (see phalanx.privacy)."""
        return self.dp_noise_multiplier > 0 or self.dp_target_epsilon > 0


@dataclass(frozen=True)
class RunConfig:
    """What one run is: its rounds, model and labels, and when it may start."""

    rounds: RoundConfig = field(default_factory=RoundConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    label_names: tuple[str, ...] = ()
    start_with: int = 0
    """Trainers to wait for before the first round (at least rounds.min_trainers)."""
    register_timeout: float = 300.0
    """Seconds to wait for those registrations before giving up."""


@dataclass(frozen=True)
class FederationConfig:
    """What the federation keeps whatever runs it hosts: its address, credentials and limits."""

    listen: str = "127.0.0.1:50051"
    heartbeat_interval: float = 1.0
    liveness_timeout: float = 10.0
    """A trainer silent for this long is left out of sampling until it is heard from again."""
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES
    max_transfers: int = 16
    """Adapters streamed at once (to and from trainers, over all runs): bounds memory however many trainers there are."""
    transfer_timeout: float = TRANSFER_FLOOR_SECONDS
    """Seconds (plus one per MiB) a trainer has to deliver its adapter once a transfer slot is free for it."""
    tls: TlsCredentials | None = None
    """Mutual TLS on every channel; None is plaintext."""
    insecure: bool = False
    """Without TLS, accept trainers (and listen) off this machine: --insecure."""
    allow_sites: Path | None = None
    """A file of the site names that may join (and their weight caps): --allow-sites."""
    registry: RegistryLimits = field(default_factory=RegistryLimits)


@dataclass(frozen=True)
class CoordinatorConfig:
    """The one-shot command: a federation with one run, set up by the same flags."""

    rounds: RoundConfig = field(default_factory=RoundConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    label_names: tuple[str, ...] = ()
    listen: str = "127.0.0.1:50051"
    out: Path = Path("runs/latest")
    start_with: int = 0
    register_timeout: float = 300.0
    heartbeat_interval: float = 1.0
    liveness_timeout: float = 10.0
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES
    max_transfers: int = 16
    transfer_timeout: float = TRANSFER_FLOOR_SECONDS
    tls: TlsCredentials | None = None
    insecure: bool = False
    allow_sites: Path | None = None
    registry: RegistryLimits = field(default_factory=RegistryLimits)

    @property
    def run(self) -> RunConfig:
        return RunConfig(self.rounds, self.model, self.label_names, self.start_with, self.register_timeout)

    @property
    def federation(self) -> FederationConfig:
        return FederationConfig(
            listen=self.listen,
            heartbeat_interval=self.heartbeat_interval,
            liveness_timeout=self.liveness_timeout,
            max_adapter_bytes=self.max_adapter_bytes,
            max_transfers=self.max_transfers,
            transfer_timeout=self.transfer_timeout,
            tls=self.tls,
            insecure=self.insecure,
            allow_sites=self.allow_sites,
            registry=self.registry,
        )
