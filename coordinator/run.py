"""One run's rounds: sample, broadcast, collect with a deadline, validate, aggregate, evaluate, checkpoint.

A `Run` keeps what belongs to one experiment: its config, global adapter, aggregation and privacy
state, outputs and telemetry. The `Federation` that hosts it keeps the sites, their liveness, the
transfer slots and the servers, which several runs share.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np
from opentelemetry.metrics import Counter, Meter, _Gauge
from opentelemetry.trace import Span, StatusCode, Tracer

from coordinator.aggregation import DpFedAvg, clip_update, create_aggregator
from coordinator.config import FederationConfig, RunConfig
from coordinator.global_adapter import GlobalAdapter, ProductMean
from coordinator.lora_math import lora_modules, mean_of_others, naive_averaging_error, product_mean
from coordinator.progress import RunProgress
from coordinator.ranks import with_rank
from coordinator.registry import Registry, TrainerEntry
from coordinator.secure_round import apply_update, settings_for
from coordinator.selection import Candidate, PerformanceTracker, SiteCapabilities, select, update_alignment
from coordinator.stopping import StoppingJudge
from coordinator.trainer_client import Broadcast, EvaluateReply, TrainReply
from phalanx.codec import WIRE_DTYPES, Adapter, AdapterError, TensorLayout, check_finite, encode, layout_of
from phalanx.identity import escaped
from phalanx.privacy import AdaptiveClip, PrivacyLedger
from phalanx.secagg import messages
from phalanx.secagg.errors import SecAggError
from phalanx.secagg.keys import Context, Verifier
from phalanx.secagg.masks import dequantise
from phalanx.secagg.messages import MASKED_TENSOR
from phalanx.secagg.protocol import ServerRound, Setup
from phalanx.streams import UNSERVABLE_KEY, status_for, status_for_secagg
from phalanx.v1 import adapter_pb2, coordinator_pb2, trainer_pb2

log = logging.getLogger(__name__)

TRACKER_KEY = "selection_tracker"
"""Checkpoint metadata: performance-aware selection's history of the sites, as JSON."""
MAX_REASON_CHARS = 500
"""A failure's reason as recorded and logged: a trainer's status details are escaped and cut to this."""


class RoundFailed(RuntimeError):
    """Too few trainers answered a round acceptably."""


class BudgetReached(RoundFailed):
    """The round would spend more privacy than the run's budget; nothing of it was released."""


@dataclass
class Participation:
    """What one trainer did in one phase of a round."""

    trainer: str
    phase: str
    status: str  # "accepted", "failed" (no usable answer) or "rejected" (bad adapter or reply)
    code: str = ""
    """gRPC status name: OK, the call's status when it failed, or the one that names a rejection."""
    reason: str = ""
    bytes_sent: int = 0
    bytes_received: int = 0
    num_examples: int = 0
    loss: float = math.nan
    accuracy: float = math.nan
    compute_seconds: float = 0.0
    """The trainer's own account of its local work (training or evaluation)."""


@dataclass
class RoundStats:
    round: int
    train: list[Participation] = field(default_factory=list)
    evaluate: list[Participation] = field(default_factory=list)
    unmask: list[Participation] = field(default_factory=list)
    """Under secure aggregation: the sites asked for shares after the masked inputs arrived."""
    seconds: float = 0.0
    train_seconds: float = 0.0
    evaluate_seconds: float = 0.0
    population: tuple[int, int] = (0, 0)
    """Live sites and sites sampled for training."""
    dp_epsilon: float | None = None
    """ε spent by the run after this round, when rounds are differentially private."""
    clip_norm: float | None = None
    """Under adaptive clipping: the clip norm of this round, and the noisy share of updates within it."""
    unclipped_fraction: float | None = None
    lora_naive_error: float | None = None
    """‖mean(B_i A_i) − mean(B_i)·mean(A_i)‖ / ‖mean(B_i A_i)‖ over the round's accepted replies."""
    selection: dict[str, Any] | None = None
    """Under a selection policy other than uniform: who was chosen and skipped, and why."""
    stop_reason: str = ""
    """The stopping rule that ends the run after this round, if one does."""

    def loss_and_accuracy(self) -> tuple[float, float]:
        ok = [p for p in self.evaluate if p.status == "accepted"]
        total = sum(p.num_examples for p in ok)
        if total == 0:
            return math.nan, math.nan
        return (sum(p.loss * p.num_examples for p in ok) / total, sum(p.accuracy * p.num_examples for p in ok) / total)

    def row(self, adapter_bytes: int, status: str) -> dict[str, Any]:
        loss, accuracy = self.loss_and_accuracy()
        trained = [p for p in self.train if p.status == "accepted"]
        weight = sum(p.num_examples for p in trained)
        everyone = self.train + self.unmask + self.evaluate
        return {
            "round": self.round,
            "status": status,
            "loss": _finite_or_none(loss),
            "accuracy": _finite_or_none(accuracy),
            "train_loss": _finite_or_none(sum(p.loss * p.num_examples for p in trained) / weight if weight else math.nan),
            "trainers_sampled": len(self.train),
            "trainers_accepted": len(trained),
            "trainers_failed": len(self.train) - len(trained),
            "evaluators": len(self.evaluate),
            "failures": [
                {"trainer": p.trainer, "phase": p.phase, "status": p.status, "code": p.code, "reason": p.reason}
                for p in everyone
                if p.status != "accepted"
            ],
            "seconds": round(self.seconds, 4),
            "train_seconds": round(self.train_seconds, 4),
            "evaluate_seconds": round(self.evaluate_seconds, 4),
            # The slowest trainer's local work per phase: the rest of a phase is coordination and wire.
            "train_compute_seconds": _slowest(trained),
            "evaluate_compute_seconds": _slowest([p for p in self.evaluate if p.status == "accepted"]),
            "bytes_sent": sum(p.bytes_sent for p in everyone),
            "bytes_received": sum(p.bytes_received for p in everyone),
            "adapter_bytes": adapter_bytes,
            **({"dp_epsilon": round(self.dp_epsilon, 6)} if self.dp_epsilon is not None else {}),
            **({"clip_norm": self.clip_norm} if self.clip_norm is not None else {}),
            **({"unclipped_fraction": round(self.unclipped_fraction, 4)} if self.unclipped_fraction is not None else {}),
            **({"lora_naive_error": round(self.lora_naive_error, 6)} if self.lora_naive_error is not None else {}),
            **({"selection": self.selection} if self.selection is not None else {}),
            **({"stop_reason": self.stop_reason} if self.stop_reason else {}),
        }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _slowest(participations: list[Participation]) -> float | None:
    return _finite_or_none(round(max((p.compute_seconds for p in participations), default=0.0), 4))


def trainer_seed(seed: int, round_: int, partition: int) -> int:
    """A per-trainer, per-round seed that is the same whenever the round is run again."""
    return int(np.random.SeedSequence([seed, round_, partition]).generate_state(1, dtype=np.uint64)[0] >> 1)


def sample_size(count: int, fraction: float, minimum: int) -> int:
    """How many of `count` trainers a round samples: `fraction` of them, at least `minimum`, at most all."""
    return min(count, max(minimum, math.ceil(fraction * count)))


def sample(trainers: list[TrainerEntry], fraction: float, minimum: int, rng: random.Random) -> list[TrainerEntry]:
    """A sample of at least `minimum` (and `fraction` of) the given trainers, drawn with `rng`."""
    k = sample_size(len(trainers), fraction, minimum)
    return sorted(rng.sample(trainers, k), key=lambda e: e.name)


def seeded(seed: int, round_: int) -> random.Random:
    """The same draws whenever round `round_` of a run seeded with `seed` is run again."""
    return random.Random(f"{seed}:{round_}")


@dataclass(frozen=True)
class RoundInstruments:
    """The round metrics, made once per process and shared by its runs (told apart by `fl.run_id`)."""

    loss: _Gauge
    accuracy: _Gauge
    epsilon: _Gauge
    clients: Counter

    @classmethod
    def create(cls, meter: Meter) -> RoundInstruments:
        return cls(
            loss=meter.create_gauge("fl.round.loss", description="aggregated evaluation loss"),
            accuracy=meter.create_gauge("fl.round.accuracy", description="aggregated evaluation accuracy"),
            epsilon=meter.create_gauge("fl.round.dp_epsilon", description="privacy spent by the run so far"),
            clients=meter.create_counter(
                "fl.round.clients", unit="{trainer}", description="trainer answers per round, by phase, status and code"
            ),
        )


class RunHost(Protocol):
    """What a run uses of the federation that hosts it."""

    registry: Registry
    slots: asyncio.Semaphore
    """Adapters streamed at once over all runs, each direction counted: bounds the coordinator's memory."""
    config: FederationConfig
    verifier: Verifier | None
    """Checks sites' signed keys in secure rounds; None without TLS."""
    tracer: Tracer
    instruments: RoundInstruments
    serves_many: bool
    """Sites serve any run: every call carries the run's RunSpec."""


class RunRecorder(Protocol):
    """Where a run's rows and checkpoints go: files in --out, or the serving coordinator's store."""

    def append_metrics(self, row: Mapping[str, Any]) -> None: ...

    def save_checkpoint(self, round_: int, adapter: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> Any: ...


def run_spec(config: RunConfig) -> trainer_pb2.RunSpec:
    """What a site needs to know of this run: its model and LoRA variant (and, serving many runs, the rest)."""
    model = config.model
    return trainer_pb2.RunSpec(
        model=model.model,
        label_names=config.label_names,
        lora_r=model.lora_r,
        lora_alpha=model.lora_alpha,
        lora_dropout=model.lora_dropout,
        target_modules=model.target_modules,
        max_length=model.max_length,
        last_round=config.rounds.rounds,
        lora_variant=trainer_pb2.LORA_VARIANT_FFA if config.rounds.lora_variant == "ffa" else trainer_pb2.LORA_VARIANT_UNSPECIFIED,
        ffa_seed=config.rounds.seed,
        mixed_ranks=config.rounds.mixed_ranks,
    )


class Run:
    def __init__(
        self,
        config: RunConfig,
        host: RunHost,
        outputs: RunRecorder,
        initial: Adapter,
        *,
        run_id: str,
        start_round: int = 1,
        on_round: Callable[[dict[str, Any]], None] = lambda row: None,
        resumed: Mapping[str, str] | None = None,
    ) -> None:
        """`resumed`: the metadata of the checkpoint a resumed run starts from (its privacy ledger)."""
        self.config = config
        self.outputs = outputs
        self.run_id = run_id
        self.global_adapter = GlobalAdapter(initial, config.rounds, config.model)
        self.start_round = start_round
        self.completed_rounds = start_round - 1
        self.completed_adapter = self.global_adapter.adapter
        """The global adapter after the last completed (checkpointed) round, or the one the run started from."""
        self.rounds_here = 0
        """Rounds (round 0 included) this process has completed."""
        self.state = coordinator_pb2.RUN_STATE_WAITING
        self._stop_requested = False
        rounds = config.rounds
        self.privacy = (
            PrivacyLedger(rounds.dp_noise_multiplier, rounds.dp_delta, [], rounds.dp_accountant) if rounds.private else None
        )
        self.adaptive_clip: AdaptiveClip | None = None
        if self.privacy is not None and rounds.dp_adaptive_clipping:
            self.adaptive_clip = AdaptiveClip(
                rounds.clip_norm, rounds.dp_target_quantile, rounds.dp_clip_lr, rounds.dp_clipped_count_stddev
            )
        if resumed is not None:
            for part in (self.privacy, self.adaptive_clip):
                if part is not None:
                    part.resume(resumed)
        self.stop_reason = ""
        """Why the run ended before its last round (a privacy budget), or empty."""
        self.refused: dict[str, str] = {}
        """Registrations (trainer ids) of sites that cannot serve this run, with their reason: not sampled again."""
        self._host = host
        self._registry = host.registry
        self._limits = host.config
        self._on_round = on_round
        self._attributes = {"fl.run_id": run_id}
        # A one-shot run's sites know its model from registration; they need the spec for its LoRA variant.
        needs_spec = host.serves_many or rounds.lora_variant != "standard" or rounds.mixed_ranks
        self._spec = run_spec(config) if needs_spec else None
        self._wire_dtype = WIRE_DTYPES[config.rounds.wire_dtype]
        federated = self.global_adapter.federated()
        self._expected = layout_of(federated, self._wire_dtype)
        self._adapter_bytes = sum(a.nbytes for a in federated.values())
        self._size = sum(a.size for a in federated.values())
        self._judge = StoppingJudge(rounds.stopping)
        self.progress = RunProgress(run_id, rounds.rounds)
        """The round in flight, its phase and each site's steps, for the terminal and the dashboard."""
        self._ruled_out = False  # a stopping rule ended the run after a completed round
        self.tracker = PerformanceTracker.from_state(json.loads(resumed.get(TRACKER_KEY, "{}")) if resumed else {})
        self._verifier: Verifier | None = None
        if rounds.secure_aggregation:
            if host.verifier is None:
                raise ValueError("secure aggregation needs TLS credentials: sites sign their keys with their certificates")
            self._verifier = host.verifier

    @property
    def adapter(self) -> Adapter:
        """The global adapter, every tensor of it (PEFT's keys)."""
        return self.global_adapter.adapter

    def replay(self, rows: list[dict[str, Any]]) -> None:
        """Take in the rows of the rounds before a resume, so the stopping rules judge the whole run
        (and a run a rule ended stays ended)."""
        for row in rows:
            if row.get("status") == "ok" and row.get("accuracy") is not None:
                self._judge.judge(row["round"], row["loss"], row["accuracy"])
            if row.get("stop_reason"):
                self.stop_reason, self._ruled_out = row["stop_reason"], True

    def stop_after_round(self) -> None:
        """Finish the round in flight (and its checkpoint), then return from run()."""
        self._stop_requested = True

    async def execute(self) -> list[dict[str, Any]]:
        """Run the remaining rounds (evaluating the initial adapter first on a fresh run).

        A round whose training phase fails is tried again up to `round_retries` times before
        RoundFailed ends the run.
        """
        rounds = self.config.rounds
        if self.start_round > rounds.rounds or self._ruled_out:  # resumed after its end: nothing is left to run
            self.state = coordinator_pb2.RUN_STATE_FINISHED
            self.progress.finish(self.stop_reason)
            return []
        await self._registry.wait_for(max(rounds.min_trainers, self.config.start_with), self.config.register_timeout)
        self.state = coordinator_pb2.RUN_STATE_RUNNING
        if self.privacy is not None and self.privacy.noise_multiplier == 0:
            await self._calibrate_noise()
        rows: list[dict[str, Any]] = []
        if self.start_round == 1:
            rows.append(await self._round(0))
        for round_ in range(self.start_round, rounds.rounds + 1):
            if self._stop_requested:
                return rows
            if await self._over_budget(round_):
                break
            for attempt in range(rounds.round_retries + 1):
                try:
                    rows.append(await self._round(round_, attempt))
                    break
                except BudgetReached as exc:
                    self.stop_reason = str(exc)
                    break
                except RoundFailed as exc:
                    if attempt == rounds.round_retries or self._stop_requested:
                        raise
                    log.warning("%s; trying the round again (%d of %d)", exc, attempt + 1, rounds.round_retries)
            if self.stop_reason and not self._ruled_out:
                break
            await asyncio.to_thread(
                self.outputs.save_checkpoint, round_, self.global_adapter.checkpoint(), self._checkpoint_metadata()
            )
            self.completed_rounds, self.completed_adapter = round_, self.global_adapter.adapter
            if self._ruled_out:
                break
        self.state = coordinator_pb2.RUN_STATE_FINISHED
        self.progress.finish(self.stop_reason)
        return rows

    def training_rng(self, round_: int) -> random.Random:
        """The draws that pick round `round_`'s trainers: seeded, so reruns sample alike, unless the run
        is private: amplification by subsampling holds only if no one can predict who trains."""
        return secrets.SystemRandom() if self.privacy is not None else seeded(self.config.rounds.seed, round_)

    def _checkpoint_metadata(self) -> dict[str, str]:
        metadata = {"run_id": self.run_id}
        if self.config.rounds.selection.policy == "performance":
            metadata[TRACKER_KEY] = json.dumps(self.tracker.to_state())
        for part in (self.privacy, self.adaptive_clip):
            if part is not None:
                metadata.update(part.to_metadata())
        return metadata

    def _eligible(self) -> list[TrainerEntry]:
        """Live sites, less those that refused this run since they registered."""
        return [e for e in self._registry.live() if e.trainer_id not in self.refused]

    def _note_unservable(self, entry: TrainerEntry, exc: grpc.aio.AioRpcError, p: Participation) -> None:
        """Leave a site that cannot serve this run out of its later rounds (until it registers again)."""
        if not any(key == UNSERVABLE_KEY for key, _ in exc.trailing_metadata() or ()):
            return
        if entry.trainer_id not in self.refused:
            self.refused[entry.trainer_id] = p.reason
            log.warning("site %s cannot serve run %s: %s; it is left out of the run's later rounds", entry.name, self.run_id, p.reason)

    def _population(self) -> tuple[int, int]:
        """Live sites and how many of them a training round samples now."""
        live = len(self._eligible())
        return live, sample_size(live, self.config.rounds.fraction_train, self.config.rounds.min_trainers)

    async def _calibrate_noise(self) -> None:
        """Choose the noise multiplier that spends the budget over the rounds left, at today's population."""
        assert self.privacy is not None
        rounds = self.config.rounds
        left = [self._population()] * (rounds.rounds - self.start_round + 1)
        try:
            await asyncio.to_thread(self.privacy.calibrate, rounds.dp_target_epsilon, left)
        except ValueError as exc:
            raise RoundFailed(str(exc)) from None
        log.info(
            "noise multiplier %.4f spends ε = %g at δ = %g over %d rounds of %d of %d sites",
            self.privacy.noise_multiplier, rounds.dp_target_epsilon, rounds.dp_delta, len(left), *reversed(left[0]),
        )  # fmt: skip

    async def _over_budget(self, round_: int, population: tuple[int, int] | None = None) -> bool:
        """Whether round `round_` would spend more than the privacy budget; if so, say why the run stops.

        Before a round, judged on the population now; `_train` judges again on the sites it sampled.
        """
        target = self.config.rounds.dp_target_epsilon
        if self.privacy is None or target <= 0:
            return False
        then = await asyncio.to_thread(self.privacy.epsilon, population or self._population())
        if then <= target:
            return False
        self.stop_reason = (
            f"privacy budget: round {round_} would bring ε to {then:.4g}, over --dp-target-epsilon {target:g}"
        )
        log.info("stopping: %s", self.stop_reason)
        return True

    async def _round(self, round_: int, attempt: int = 0) -> dict[str, Any]:
        """Round 0 only evaluates the initial adapter; later rounds train, aggregate and evaluate."""
        stats = RoundStats(round_)
        started = time.perf_counter()
        failure: RoundFailed | None = None
        self.progress.begin_round(round_)
        with self._host.tracer.start_as_current_span("fl.round", attributes={"fl.round": round_, **self._attributes}) as span:
            if attempt:
                span.set_attribute("fl.attempt", attempt)
            try:
                if round_ > 0:
                    self.global_adapter.step(await self._train(round_, stats, span, attempt))
                    if self.privacy is not None:
                        self.privacy.record(*stats.population)
                stats.train_seconds = time.perf_counter() - started
                if await self._evaluates(round_):
                    await self._evaluate(round_, stats)
            except RoundFailed as exc:
                failure = exc
                span.set_status(StatusCode.ERROR, str(exc))
            stats.seconds = time.perf_counter() - started
            stats.evaluate_seconds = stats.seconds - stats.train_seconds if failure is None else 0.0
            if self.privacy is not None:
                stats.dp_epsilon = await asyncio.to_thread(self.privacy.epsilon)
                span.set_attribute("fl.dp.epsilon", stats.dp_epsilon)
                self._host.instruments.epsilon.set(stats.dp_epsilon, self._attributes)
            loss, accuracy = stats.loss_and_accuracy()
            if failure is None and (reason := self._judge.judge(round_, loss, accuracy)) and round_ > 0:
                self.stop_reason, self._ruled_out = reason, True
                stats.stop_reason = reason
                span.set_attribute("fl.stop_reason", reason)
                log.info("stopping: %s", reason)
            if math.isfinite(loss):
                span.set_attributes({"fl.loss": loss, "fl.accuracy": accuracy})
                self._host.instruments.loss.set(loss, self._attributes)
                self._host.instruments.accuracy.set(accuracy, self._attributes)
            for p in stats.train + stats.evaluate:
                self._host.instruments.clients.add(
                    1, {**self._attributes, "fl.phase": p.phase, "fl.status": p.status, "rpc.grpc.status_code": p.code}
                )
                if p.status != "accepted":
                    span.add_event(
                        f"fl.client.{p.status}",
                        {"fl.trainer": p.trainer, "fl.phase": p.phase, "rpc.grpc.status_code": p.code, "fl.reason": p.reason},
                    )
                    log.warning("round %d: %s %s %s: %s %s", round_, p.phase, p.status, p.trainer, p.code, p.reason)
        row = stats.row(self._adapter_bytes, "failed" if failure else "ok")
        self.rounds_here += failure is None
        if attempt:
            row["attempt"] = attempt
        await asyncio.to_thread(self.outputs.append_metrics, row)
        self._on_round(row)
        self.progress.round_done(row)
        if failure is not None:
            raise failure
        return row

    async def _ask(
        self, entry: TrainerEntry, phase: str, call: Callable[[], Awaitable[Any]], accept: Callable[[Any, Participation], None]
    ) -> Participation:
        """Make one call to one trainer and sort its outcome: accepted, failed (no answer) or rejected."""
        p = Participation(entry.name, phase, "failed")
        try:
            reply = await call()
            self._registry.heard_from(entry)  # an answer shows the trainer alive, as a heartbeat would
            p.bytes_sent, p.bytes_received = reply.bytes_sent, reply.bytes_received
            accept(reply, p)
            p.status, p.code = "accepted", grpc.StatusCode.OK.name
        except grpc.aio.AioRpcError as exc:
            p.code, p.reason = exc.code().name, escaped(exc.details() or "", MAX_REASON_CHARS)
            self._note_unservable(entry, exc, p)
        except AdapterError as exc:
            p.status, p.code, p.reason = "rejected", status_for(exc).name, escaped(exc, MAX_REASON_CHARS)
        self._answered(p)
        return p

    def _answered(self, p: Participation) -> None:
        self.progress.site_answered(
            p.trainer, p.phase, p.status, p.reason, p.bytes_sent + p.bytes_received, p.compute_seconds, p.loss
        )

    def _stepped(self, entry: TrainerEntry) -> Callable[[int, float], None]:
        """What a site's progress reports in this round update."""
        return lambda step, loss: self.progress.site_step(entry.name, step, loss)

    async def _train(self, round_: int, stats: RoundStats, span: Span, attempt: int = 0) -> Adapter | ProductMean:
        rounds = self.config.rounds
        live = self._eligible()
        sampled = self._select(live, round_, stats)
        stats.population = (len(live), len(sampled))
        span.set_attribute("fl.clients", len(sampled))
        if await self._over_budget(round_, stats.population):  # the population shrank since the check before the round
            raise BudgetReached(self.stop_reason)
        if len(sampled) < rounds.min_trainers:
            raise RoundFailed(f"round {round_}: only {len(sampled)} live trainers, need {rounds.min_trainers}")
        current = self.global_adapter.federated()
        adapters = await self._adapters_for(sampled, trainer_pb2.TrainRequest)  # one per rank: one unless ranks are mixed
        self.progress.begin_phase("train", [e.name for e in sampled], rounds.local_steps)

        def header_for(entry: TrainerEntry) -> trainer_pb2.TrainHeader:
            return trainer_pb2.TrainHeader(
                run_id=self.run_id,
                round=round_,
                local_steps=rounds.local_steps,
                batch_size=rounds.batch_size,
                learning_rate=rounds.learning_rate,
                seed=trainer_seed(rounds.seed, round_, entry.partition),
                reply_dtype=self._wire_dtype,
                adapter=adapters[self._rank_of(entry)][1],
                run=self._spec,
                batch_order=trainer_pb2.BatchOrder.Value(f"BATCH_ORDER_{rounds.batch_order.upper()}"),
                proximal_mu=rounds.proximal_mu,
            )

        if self.global_adapter.mixed:
            return await self._train_mixed(round_, stats, sampled, header_for, adapters)
        broadcast = adapters[0][0]
        clip_norm = self.adaptive_clip.norm if self.adaptive_clip is not None else rounds.clip_norm
        update_noise, count_noise = self._noise(len(sampled))
        if rounds.secure_aggregation:
            return await self._train_secure(
                round_, attempt, stats, sampled, header_for, broadcast, clip_norm, update_noise * clip_norm, count_noise
            )
        if self.privacy is not None:
            aggregator = DpFedAvg(current, sampled=len(sampled), noise_std=update_noise * clip_norm)
        else:
            aggregator = create_aggregator(
                rounds.aggregator, current, trim=rounds.trim,
                byzantine=None if rounds.krum_byzantine < 0 else rounds.krum_byzantine, keep=rounds.multi_krum_keep or None,
            )  # fmt: skip
        held: dict[str, tuple[Adapter, float]] = {}  # accepted replies, when folded in a fixed order
        # For the round's diagnostics, until it ends: each reply's LoRA factors (or, for performance-aware
        # selection, all of it), weight and compute seconds.
        # (Not under DP: figures drawn from single sites' updates would bypass its guarantee.)
        replies: dict[str, tuple[Adapter, float, float]] = {}
        kept = set(current) if rounds.selection.policy == "performance" else set()
        if not self.global_adapter.ffa and self.privacy is None:
            kept.update(key for _, a, b in lora_modules(current) for key in (a, b))
        unclipped = 0

        def accept(entry: TrainerEntry, reply: TrainReply, p: Participation) -> None:
            adapter, weight = reply.adapter, self._weight(entry, reply.result.num_examples)
            if self.privacy is not None:
                weight = 1.0  # uniform: a site's influence is bounded by the clip norm alone
            within = True
            if clip_norm > 0:
                adapter, norm = clip_update(current, adapter, clip_norm)
                within = norm <= clip_norm
                if not within:
                    log.info("round %d: update of %s clipped from norm %.4g to %g", round_, entry.name, norm, clip_norm)
            if rounds.deterministic:
                aggregator.check(adapter, weight)
                held[entry.name] = (adapter, weight)
            else:
                aggregator.add(adapter, weight)
            replies[entry.name] = ({k: adapter[k] for k in kept}, weight, reply.result.seconds)
            nonlocal unclipped
            unclipped += within
            p.num_examples, p.loss, p.compute_seconds = reply.result.num_examples, reply.result.loss, reply.result.seconds

        def train_one(entry: TrainerEntry) -> Awaitable[Participation]:
            return self._ask(
                entry,
                "train",
                lambda: entry.client.train(
                    header_for(entry), broadcast, expected=self._expected, timeout=rounds.round_timeout, slots=self._host.slots,
                    max_bytes=self._limits.max_adapter_bytes, transfer_floor=self._limits.transfer_timeout,
                    on_progress=self._stepped(entry),
                ),  # fmt: skip
                lambda reply, p: accept(entry, reply, p),
            )

        stats.train = list(await asyncio.gather(*(train_one(e) for e in sampled)))
        self.progress.begin_phase("aggregate")
        for name in sorted(held):  # sampled trainers are unique by name, so this order is fixed
            aggregator.add(*held[name])
        accepted = sum(p.status == "accepted" for p in stats.train)
        if accepted < rounds.min_trainers:
            reasons = "; ".join(f"{p.trainer}: {p.code} {p.reason}" for p in stats.train if p.status != "accepted")
            raise RoundFailed(f"round {round_}: {accepted} accepted replies, need {rounds.min_trainers} ({reasons})")
        result = await asyncio.to_thread(aggregator.result)  # the robust and private ones are heavy
        try:
            check_finite(result)
        except AdapterError as exc:
            raise RoundFailed(f"round {round_}: the aggregate is not finite ({exc}); the previous global adapter stays") from None
        if self.adaptive_clip is not None:
            self._adapt_clip(stats, clip_norm, self.adaptive_clip.noisy_fraction(unclipped, len(sampled), count_noise))
        await asyncio.to_thread(self._diagnose, current, result, replies, stats)
        if stats.lora_naive_error is not None:
            span.set_attribute("fl.lora.naive_error", stats.lora_naive_error)
        return result

    def _rank_of(self, entry: TrainerEntry) -> int:
        """The LoRA rank a site trains at: its own in a run with mixed ranks, else the run's (0)."""
        return entry.lora_rank if self.global_adapter.mixed else 0

    async def _adapters_for(
        self, entries: list[TrainerEntry], request: type
    ) -> dict[int, tuple[Broadcast, adapter_pb2.AdapterManifest]]:
        """The global adapter encoded for each rank among `entries` (one, the run's, unless ranks are mixed)."""
        ranks = sorted({self._rank_of(e) for e in entries})

        def encode_all() -> dict[int, tuple[Broadcast, adapter_pb2.AdapterManifest]]:
            out = {}
            for rank in ranks:
                adapter = self.global_adapter.for_rank(rank) if rank else self.global_adapter.federated()
                encoded = encode(adapter, self._wire_dtype)
                out[rank] = (Broadcast.of(request, encoded), encoded.manifest)
            return out

        return await asyncio.to_thread(encode_all) if self.global_adapter.mixed else encode_all()

    async def _train_mixed(
        self,
        round_: int,
        stats: RoundStats,
        sampled: list[TrainerEntry],
        header_for: Callable[[TrainerEntry], trainer_pb2.TrainHeader],
        adapters: Mapping[int, tuple[Broadcast, adapter_pb2.AdapterManifest]],
    ) -> ProductMean:
        """A round of sites at their own LoRA ranks: each gets the global update at its rank, and the
        aggregate is the mean of the products s_i·B_i·A_i (exact), with the mean of the other tensors."""
        rounds = self.config.rounds
        replies: dict[str, tuple[Adapter, float, float]] = {}

        def accept(entry: TrainerEntry, reply: TrainReply, p: Participation) -> None:
            weight = self._weight(entry, reply.result.num_examples)
            replies[entry.name] = (reply.adapter, weight, self.global_adapter.scale(entry.lora_rank))
            p.num_examples, p.loss, p.compute_seconds = reply.result.num_examples, reply.result.loss, reply.result.seconds

        def train_one(entry: TrainerEntry) -> Awaitable[Participation]:
            broadcast = adapters[entry.lora_rank][0]
            header = header_for(entry)
            return self._ask(
                entry,
                "train",
                lambda: entry.client.train(
                    header, broadcast, expected=with_rank(self._expected, entry.lora_rank), timeout=rounds.round_timeout,
                    slots=self._host.slots, max_bytes=self._limits.max_adapter_bytes, transfer_floor=self._limits.transfer_timeout,
                    on_progress=self._stepped(entry),
                ),  # fmt: skip
                lambda reply, p: accept(entry, reply, p),
            )

        stats.train = list(await asyncio.gather(*(train_one(e) for e in sampled)))
        self.progress.begin_phase("aggregate")
        if len(replies) < rounds.min_trainers:
            reasons = "; ".join(f"{p.trainer}: {p.code} {p.reason}" for p in stats.train if p.status != "accepted")
            raise RoundFailed(f"round {round_}: {len(replies)} accepted replies, need {rounds.min_trainers} ({reasons})")

        def aggregate() -> ProductMean:
            names = sorted(replies)
            sites, weights, scales = zip(*(replies[n] for n in names), strict=True)
            lora = {key for _, a, b in lora_modules(sites[0]) for key in (a, b)}
            return ProductMean(product_mean(sites, weights, scales), mean_of_others(sites, weights, lora))

        result = await asyncio.to_thread(aggregate)
        try:
            check_finite({**result.deltas, **result.others})
        except AdapterError as exc:
            raise RoundFailed(f"round {round_}: the aggregate is not finite ({exc}); the previous global adapter stays") from None
        return result

    def _select(self, live: list[TrainerEntry], round_: int, stats: RoundStats) -> list[TrainerEntry]:
        """The round's trainers, by the run's selection policy; a policy other than uniform says why, in the row."""
        rounds = self.config.rounds
        k = sample_size(len(live), rounds.fraction_train, rounds.min_trainers)
        candidates = [
            Candidate(e.name, SiteCapabilities(e.capabilities.cores, e.capabilities.memory_bytes, e.capabilities.accelerator, e.num_train_examples))
            for e in live
        ]  # fmt: skip
        selection = select(candidates, k, rounds.selection, self.training_rng(round_), self.tracker)
        if rounds.selection.policy != "uniform":
            stats.selection = selection.to_row(rounds.selection.policy)
            for site, reason in selection.skipped.items():
                log.info("round %d: site %s not selected: %s", round_, site, reason)
        by_name = {e.name: e for e in live}
        return [by_name[name] for name in selection.chosen]

    def _diagnose(
        self, current: Adapter, result: Adapter, replies: Mapping[str, tuple[Adapter, float, float]], stats: RoundStats
    ) -> None:
        """After aggregating (in a worker thread): the error naive factor averaging makes, and each site's
        speed and help for performance-aware selection."""
        if self.global_adapter.ffa:
            stats.lora_naive_error = 0.0  # every site shares lora_A: averaging lora_B alone is exact
        elif self.privacy is None and replies and lora_modules(current):
            names = sorted(replies)
            stats.lora_naive_error = naive_averaging_error([replies[n][0] for n in names], [replies[n][1] for n in names])
        if self.config.rounds.selection.policy == "performance":
            step = {k: result[k] - current[k] for k in current}
            for name, (adapter, _, seconds) in replies.items():
                self.tracker.record(name, seconds, update_alignment({k: adapter[k] - current[k] for k in current}, step))

    def _noise(self, sampled: int) -> tuple[float, float]:
        """The noise multipliers of a round of `sampled` sites: on the update sum, and on the count of
        unclipped updates under adaptive clipping (both 0 for a round that is not private)."""
        if self.privacy is None:
            return 0.0, 0.0
        if self.adaptive_clip is None:
            return self.privacy.noise_multiplier, 0.0
        try:
            return self.adaptive_clip.noise(self.privacy.noise_multiplier, sampled)
        except ValueError as exc:
            raise RoundFailed(str(exc)) from None

    def _adapt_clip(self, stats: RoundStats, used: float, fraction: float) -> None:
        """Record the round's clip norm and noisy unclipped share, and move the clip norm for the next round."""
        assert self.adaptive_clip is not None
        stats.clip_norm, stats.unclipped_fraction = used, fraction
        self.adaptive_clip.step(fraction)

    async def _train_secure(
        self,
        round_: int,
        attempt: int,
        stats: RoundStats,
        sampled: list[TrainerEntry],
        header_for: Callable[[TrainerEntry], trainer_pb2.TrainHeader],
        broadcast: Broadcast,
        clip_norm: float,
        noise_std: float,
        count_noise: float,
    ) -> Adapter:
        """A round whose replies are masked (phalanx.secagg): keys, shares, masked inputs, unmask.

        A site that fails or is refused at any stage is left out of the rest; one that drops
        after sharing its keys has its masks removed from the sum with its neighbours' shares.
        The round fails if fewer than the threshold of masked inputs arrive or a mask cannot be
        removed; then nothing of it is released.
        """
        rounds = self.config.rounds
        assert self._verifier is not None
        parts = {e.name: Participation(e.name, "train", "failed") for e in sampled}
        stats.train = list(parts.values())
        entries, weights = {}, {}
        for entry in sampled:
            try:
                weights[entry.name] = self._secure_weight(entry)
                entries[entry.name] = entry
            except AdapterError as exc:
                parts[entry.name].status, parts[entry.name].reason = "rejected", escaped(exc, MAX_REASON_CHARS)
        # Under DP every site weighs 1/m for the m sampled, as DP-FedAvg divides by m.
        total_weight = float(len(sampled)) if self.privacy is not None else sum(weights.values())
        settings = settings_for(rounds, len(entries), clip_norm, noise_std, count_noise)
        counting = self.adaptive_clip is not None  # one more word: the (noisy) count of unclipped updates
        length = self._size + counting
        context = Context(self.run_id, round_, attempt)
        try:
            setup = Setup(context, tuple(entries), settings.neighbours, settings.threshold)
        except SecAggError as exc:
            raise RoundFailed(f"round {round_}: {exc}") from None
        server = ServerRound(setup, self._verifier, length)
        masked_layout = (TensorLayout(MASKED_TENSOR, adapter_pb2.DATA_TYPE_UINT32, (length,)),)
        secure_round = messages.round_of(context)
        timeout = rounds.round_timeout

        async def stage(p: Participation, step: str, call: Callable[[TrainerEntry], Awaitable[Any]], accept: Callable[[Any], None]) -> None:
            """One site's call at one stage; a failure or refusal is recorded on `p`."""
            try:
                reply = await call(entries[p.trainer])
                self._registry.heard_from(entries[p.trainer])
                accept(reply)
            except grpc.aio.AioRpcError as exc:
                p.status, p.code = "failed", exc.code().name
                p.reason = f"{step}: " + escaped(exc.details() or "", MAX_REASON_CHARS)
                self._note_unservable(entries[p.trainer], exc, p)
            except (SecAggError, AdapterError) as exc:
                p.status, p.reason = "rejected", f"{step}: " + escaped(exc, MAX_REASON_CHARS)
                p.code = (status_for(exc) if isinstance(exc, AdapterError) else status_for_secagg(exc)).name

        def unary(p: Participation, request: Any, rpc: str) -> Callable[[TrainerEntry], Awaitable[Any]]:
            async def call(entry: TrainerEntry) -> Any:
                reply = await getattr(entry.client, rpc)(request, timeout)
                p.bytes_sent += request.ByteSize()
                p.bytes_received += reply.ByteSize()
                return reply

            return call

        with self._host.tracer.start_as_current_span("fl.secagg.keys", attributes={"fl.clients": len(entries)}) as span:
            span.set_attributes({"fl.secagg.neighbours": settings.neighbours, "fl.secagg.threshold": settings.threshold})
            advertise = trainer_pb2.AdvertiseKeysRequest(
                round=secure_round, participants=list(entries), neighbours=settings.neighbours, threshold=settings.threshold
            )
            await asyncio.gather(*(
                stage(parts[name], "keys", unary(parts[name], advertise, "advertise_keys"),
                      lambda r, n=name: server.accept_keys(n, messages.keys_from_message(r.keys)))
                for name in entries
            ))  # fmt: skip

        def share_request(name: str) -> trainer_pb2.ShareKeysRequest:
            return trainer_pb2.ShareKeysRequest(
                round=secure_round, neighbours=[messages.keys_to_message(k) for k in server.keys_for(name)]
            )

        with self._host.tracer.start_as_current_span("fl.secagg.shares", attributes={"fl.clients": len(server.keys)}):
            await asyncio.gather(*(
                stage(parts[name], "shares", unary(parts[name], share_request(name), "share_keys"),
                      lambda r, n=name: server.accept_shares(n, messages.by_site(r.shares, "shares")))
                for name in list(server.keys)
            ))  # fmt: skip

        def masked_input(name: str) -> Callable[[TrainerEntry], Awaitable[TrainReply]]:
            async def call(entry: TrainerEntry) -> TrainReply:
                header = header_for(entry)
                header.secure_aggregation.CopyFrom(
                    trainer_pb2.SecureAggregation(
                        attempt=attempt,
                        shares=messages.sealed_list(server.shares_for(name)),
                        weight_share=weights[name] / total_weight,
                        clip_range=settings.clip_range,
                        clip_norm=clip_norm,
                        noise_std=settings.noise_std,
                        count_unclipped=counting,
                        count_noise_std=settings.count_noise_std,
                    )
                )
                reply = await entry.client.train(
                    header, broadcast, expected=masked_layout, timeout=timeout, slots=self._host.slots,
                    max_bytes=self._limits.max_adapter_bytes, transfer_floor=self._limits.transfer_timeout,
                    on_progress=self._stepped(entry),
                )  # fmt: skip
                parts[name].bytes_sent += reply.bytes_sent
                parts[name].bytes_received += reply.bytes_received
                return reply

            return call

        def accept_masked(name: str, reply: TrainReply) -> None:
            server.accept_masked(name, np.asarray(reply.adapter[MASKED_TENSOR]))
            p = parts[name]
            p.status, p.code = "accepted", grpc.StatusCode.OK.name
            p.num_examples, p.loss, p.compute_seconds = reply.result.num_examples, reply.result.loss, reply.result.seconds

        with self._host.tracer.start_as_current_span("fl.secagg.masked_input", attributes={"fl.clients": len(server.shared)}):
            await asyncio.gather(*(
                stage(parts[name], "masked input", masked_input(name), lambda r, n=name: accept_masked(n, r))
                for name in server.shared
            ))  # fmt: skip
        for p in parts.values():
            self._answered(p)
        self.progress.begin_phase("aggregate")

        with self._host.tracer.start_as_current_span("fl.secagg.unmask") as span:
            try:
                survivors, dropped = server.start_unmask(settings.min_survivors)
            except SecAggError as exc:
                reasons = "; ".join(f"{p.trainer}: {p.code} {p.reason}" for p in stats.train if p.status != "accepted")
                raise RoundFailed(f"round {round_}: {exc} ({reasons})") from None
            span.set_attributes({"fl.secagg.survivors": len(survivors), "fl.secagg.dropped": len(dropped)})
            request = trainer_pb2.UnmaskRequest(round=secure_round, survivors=survivors, dropped=dropped)
            stats.unmask = [Participation(name, "unmask", "accepted", grpc.StatusCode.OK.name) for name in server.shared]
            await asyncio.gather(*(
                stage(p, "unmask", unary(p, request, "unmask"),
                      lambda r, n=p.trainer: server.accept_revealed(
                          n, messages.by_site(r.seed_shares, "seed shares"), messages.by_site(r.key_shares, "key shares")))
                for p in stats.unmask
            ))  # fmt: skip
            try:
                total = await asyncio.to_thread(server.result)
            except SecAggError as exc:
                raise RoundFailed(f"round {round_}: {exc}") from None
        summed = dequantise(total, settings.clip_range, len(entries))
        if counting:
            self._adapt_clip(stats, clip_norm, float(summed[-1]) / clip_norm)  # weights 1/m: already a share
            summed = summed[:-1]
        if self.privacy is None:
            summed /= sum(weights[name] for name in survivors) / total_weight  # FedAvg over the survivors
        return apply_update(self.global_adapter.federated(), summed)

    def _secure_weight(self, entry: TrainerEntry) -> float:
        """A site's weight in a secure round, fixed before it trains: uniform under DP, else its
        registered example count capped by the allowlist."""
        if self.privacy is not None:
            return 1.0
        return self._weight(entry, entry.num_train_examples)

    def _weight(self, entry: TrainerEntry, claimed: int) -> float:
        """A reply's FedAvg weight: its example count, bounded by what the site registered and by the allowlist."""
        if claimed > entry.num_train_examples:
            raise AdapterError(
                f"reply claims {claimed} training examples; site {entry.name} registered {entry.num_train_examples}"
            )
        if self._registry.allowlist is None:
            return float(claimed)
        listed = self._registry.allowlist.sites().get(entry.name)
        if listed is None:
            raise AdapterError(f"site {entry.name} is no longer in --allow-sites")
        return float(min(claimed, listed.max_weight))

    async def _evaluates(self, round_: int) -> bool:
        """Rounds 0, N, 2N, ... evaluate (N: evaluate_every), and so does the run's last round: the
        last of --rounds, one after which the run is asked to stop, or one the privacy budget ends."""
        rounds = self.config.rounds
        if round_ % rounds.evaluate_every == 0 or round_ == rounds.rounds or self._stop_requested:
            return True
        if self.privacy is None or rounds.dp_target_epsilon <= 0:
            return False
        return await asyncio.to_thread(self.privacy.epsilon, self._population()) > rounds.dp_target_epsilon

    async def _evaluate(self, round_: int, stats: RoundStats) -> None:
        rounds = self.config.rounds
        chosen = sample(self._eligible(), rounds.fraction_evaluate, 1, seeded(rounds.seed + 1, round_))
        adapters = await self._adapters_for(chosen, trainer_pb2.EvaluateRequest)
        self.progress.begin_phase("evaluate", [e.name for e in chosen])

        def header_for(entry: TrainerEntry) -> trainer_pb2.EvaluateHeader:
            return trainer_pb2.EvaluateHeader(
                run_id=self.run_id,
                round=round_,
                batch_size=rounds.eval_batch_size,
                max_examples=rounds.eval_max_examples,
                adapter=adapters[self._rank_of(entry)][1],
                run=self._spec,
            )

        def accept(entry: TrainerEntry, reply: EvaluateReply, p: Participation) -> None:
            r = reply.result
            if not (0 < r.num_examples <= entry.num_test_examples and math.isfinite(r.loss) and 0.0 <= r.accuracy <= 1.0):
                raise AdapterError(
                    f"implausible evaluation: {r.num_examples} examples (site {entry.name} registered "
                    f"{entry.num_test_examples}), loss {r.loss}, accuracy {r.accuracy}"
                )
            p.num_examples, p.loss, p.accuracy, p.compute_seconds = r.num_examples, r.loss, r.accuracy, r.seconds

        stats.evaluate = list(
            await asyncio.gather(
                *(
                    self._ask(
                        e,
                        "evaluate",
                        lambda e=e: e.client.evaluate(
                            header_for(e), adapters[self._rank_of(e)][0], timeout=rounds.round_timeout, slots=self._host.slots
                        ),
                        lambda reply, p, e=e: accept(e, reply, p),
                    )
                    for e in chosen
                )
            )
        )
