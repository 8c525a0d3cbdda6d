"""The round loop: sample, broadcast, collect with a deadline, validate, aggregate, evaluate, checkpoint."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from opentelemetry.trace import Span, StatusCode

from coordinator.aggregation import DpFedAvg, clip_update, create_aggregator
from coordinator.config import CoordinatorConfig
from coordinator.outputs import RunOutputs
from coordinator.registry import Registry, TrainerEntry
from coordinator.trainer_client import Broadcast, EvaluateReply, TrainReply
from phalanx.codec import WIRE_DTYPES, Adapter, AdapterError, check_finite, encode, layout_of
from phalanx.identity import escaped
from phalanx.privacy import PrivacyLedger
from phalanx.streams import status_for
from phalanx.telemetry import Telemetry
from phalanx.v1 import coordinator_pb2, trainer_pb2

log = logging.getLogger(__name__)

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
    seconds: float = 0.0
    train_seconds: float = 0.0
    evaluate_seconds: float = 0.0
    population: tuple[int, int] = (0, 0)
    """Live sites and sites sampled for training."""
    dp_epsilon: float | None = None
    """ε spent by the run after this round, when rounds are differentially private."""

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
        everyone = self.train + self.evaluate
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


class Federation:
    def __init__(
        self,
        config: CoordinatorConfig,
        registry: Registry,
        telemetry: Telemetry,
        outputs: RunOutputs,
        initial: Adapter,
        *,
        run_id: str,
        start_round: int = 1,
        on_round: Callable[[dict[str, Any]], None] = lambda row: None,
        resumed: Mapping[str, str] | None = None,
    ) -> None:
        """`resumed`: the metadata of the checkpoint a resumed run starts from (its privacy ledger)."""
        self.config = config
        self.registry = registry
        self.outputs = outputs
        self.run_id = run_id
        self.adapter = initial
        self.start_round = start_round
        self.completed_rounds = start_round - 1
        self.state = coordinator_pb2.RUN_STATE_WAITING
        self._stop_requested = False
        rounds = config.rounds
        self.privacy = PrivacyLedger(rounds.dp_noise_multiplier, rounds.dp_delta, []) if rounds.private else None
        if self.privacy is not None and resumed is not None:
            self.privacy.resume(resumed)
        self.stop_reason = ""
        """Why the run ended before its last round (a privacy budget), or empty."""
        # Adapters streamed at once, each direction counted: bounds memory however many trainers answer.
        self._slots = asyncio.Semaphore(config.max_transfers)
        self._on_round = on_round
        self._wire_dtype = WIRE_DTYPES[config.rounds.wire_dtype]
        self._expected = layout_of(initial, self._wire_dtype)
        self._adapter_bytes = sum(a.nbytes for a in initial.values())
        self._tracer = telemetry.tracer()
        meter = telemetry.meter()
        self._loss_gauge = meter.create_gauge("fl.round.loss", description="aggregated evaluation loss")
        self._accuracy_gauge = meter.create_gauge("fl.round.accuracy", description="aggregated evaluation accuracy")
        self._clients = meter.create_counter(
            "fl.round.clients", unit="{trainer}", description="trainer answers per round, by phase, status and code"
        )
        self._epsilon_gauge = meter.create_gauge("fl.round.dp_epsilon", description="privacy spent by the run so far")

    def stop_after_round(self) -> None:
        """Finish the round in flight (and its checkpoint), then return from run()."""
        self._stop_requested = True

    async def run(self) -> list[dict[str, Any]]:
        """Run the remaining rounds (evaluating the initial adapter first on a fresh run).

        A round whose training phase fails is tried again up to `round_retries` times before
        RoundFailed ends the run.
        """
        rounds = self.config.rounds
        await self.registry.wait_for(max(rounds.min_trainers, self.config.start_with), self.config.register_timeout)
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
            if self.stop_reason:
                break
            await asyncio.to_thread(self.outputs.save_checkpoint, round_, self.adapter, self._checkpoint_metadata())
            self.completed_rounds = round_
        self.state = coordinator_pb2.RUN_STATE_FINISHED
        return rows

    def training_rng(self, round_: int) -> random.Random:
        """The draws that pick round `round_`'s trainers: seeded, so reruns sample alike, unless the run
        is private: amplification by subsampling holds only if no one can predict who trains."""
        return secrets.SystemRandom() if self.privacy is not None else seeded(self.config.rounds.seed, round_)

    def _checkpoint_metadata(self) -> dict[str, str]:
        metadata = {"run_id": self.run_id}
        if self.privacy is not None:
            metadata.update(self.privacy.to_metadata())
        return metadata

    def _population(self) -> tuple[int, int]:
        """Live sites and how many of them a training round samples now."""
        live = len(self.registry.live())
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
        with self._tracer.start_as_current_span("fl.round", attributes={"fl.round": round_}) as span:
            if attempt:
                span.set_attribute("fl.attempt", attempt)
            try:
                if round_ > 0:
                    self.adapter = await self._train(round_, stats, span)
                    if self.privacy is not None:
                        self.privacy.record(*stats.population)
                stats.train_seconds = time.perf_counter() - started
                await self._evaluate(round_, stats)
            except RoundFailed as exc:
                failure = exc
                span.set_status(StatusCode.ERROR, str(exc))
            stats.seconds = time.perf_counter() - started
            stats.evaluate_seconds = stats.seconds - stats.train_seconds if failure is None else 0.0
            if self.privacy is not None:
                stats.dp_epsilon = await asyncio.to_thread(self.privacy.epsilon)
                span.set_attribute("fl.dp.epsilon", stats.dp_epsilon)
                self._epsilon_gauge.set(stats.dp_epsilon)
            loss, accuracy = stats.loss_and_accuracy()
            if math.isfinite(loss):
                span.set_attributes({"fl.loss": loss, "fl.accuracy": accuracy})
                self._loss_gauge.set(loss)
                self._accuracy_gauge.set(accuracy)
            for p in stats.train + stats.evaluate:
                self._clients.add(1, {"fl.phase": p.phase, "fl.status": p.status, "rpc.grpc.status_code": p.code})
                if p.status != "accepted":
                    span.add_event(
                        f"fl.client.{p.status}",
                        {"fl.trainer": p.trainer, "fl.phase": p.phase, "rpc.grpc.status_code": p.code, "fl.reason": p.reason},
                    )
                    log.warning("round %d: %s %s %s: %s %s", round_, p.phase, p.status, p.trainer, p.code, p.reason)
        row = stats.row(self._adapter_bytes, "failed" if failure else "ok")
        if attempt:
            row["attempt"] = attempt
        self.outputs.append_metrics(row)
        self._on_round(row)
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
            self.registry.heard_from(entry)  # an answer shows the trainer alive, as a heartbeat would
            p.bytes_sent, p.bytes_received = reply.bytes_sent, reply.bytes_received
            accept(reply, p)
            p.status, p.code = "accepted", grpc.StatusCode.OK.name
        except grpc.aio.AioRpcError as exc:
            p.code, p.reason = exc.code().name, escaped(exc.details() or "", MAX_REASON_CHARS)
        except AdapterError as exc:
            p.status, p.code, p.reason = "rejected", status_for(exc).name, escaped(exc, MAX_REASON_CHARS)
        return p

    async def _train(self, round_: int, stats: RoundStats, span: Span) -> Adapter:
        rounds = self.config.rounds
        live = self.registry.live()
        sampled = sample(live, rounds.fraction_train, rounds.min_trainers, self.training_rng(round_))
        stats.population = (len(live), len(sampled))
        span.set_attribute("fl.clients", len(sampled))
        if await self._over_budget(round_, stats.population):  # the population shrank since the check before the round
            raise BudgetReached(self.stop_reason)
        if len(sampled) < rounds.min_trainers:
            raise RoundFailed(f"round {round_}: only {len(sampled)} live trainers, need {rounds.min_trainers}")
        encoded = encode(self.adapter, self._wire_dtype)
        broadcast = Broadcast.of(trainer_pb2.TrainRequest, encoded)
        if self.privacy is not None:
            noise_std = self.privacy.noise_multiplier * rounds.clip_norm
            aggregator = DpFedAvg(self.adapter, sampled=len(sampled), noise_std=noise_std)
        else:
            aggregator = create_aggregator(rounds.aggregator, self.adapter, trim=rounds.trim)
        held: dict[str, tuple[Adapter, float]] = {}  # accepted replies, when folded in a fixed order

        def accept(entry: TrainerEntry, reply: TrainReply, p: Participation) -> None:
            adapter, weight = reply.adapter, self._weight(entry, reply.result.num_examples)
            if self.privacy is not None:
                weight = 1.0  # uniform: a site's influence is bounded by the clip norm alone
            if rounds.clip_norm > 0:
                adapter, norm = clip_update(self.adapter, adapter, rounds.clip_norm)
                if norm > rounds.clip_norm:
                    log.info("round %d: update of %s clipped from norm %.4g to %g", round_, entry.name, norm, rounds.clip_norm)
            if rounds.deterministic:
                aggregator.check(adapter, weight)
                held[entry.name] = (adapter, weight)
            else:
                aggregator.add(adapter, weight)
            p.num_examples, p.loss, p.compute_seconds = reply.result.num_examples, reply.result.loss, reply.result.seconds

        def train_one(entry: TrainerEntry) -> Awaitable[Participation]:
            header = trainer_pb2.TrainHeader(
                run_id=self.run_id,
                round=round_,
                local_steps=rounds.local_steps,
                batch_size=rounds.batch_size,
                learning_rate=rounds.learning_rate,
                seed=trainer_seed(rounds.seed, round_, entry.partition),
                reply_dtype=self._wire_dtype,
                adapter=encoded.manifest,
            )
            return self._ask(
                entry,
                "train",
                lambda: entry.client.train(
                    header, broadcast, expected=self._expected, timeout=rounds.round_timeout, slots=self._slots,
                    max_bytes=self.config.max_adapter_bytes, transfer_floor=self.config.transfer_timeout,
                ),  # fmt: skip
                lambda reply, p: accept(entry, reply, p),
            )

        stats.train = list(await asyncio.gather(*(train_one(e) for e in sampled)))
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
        return result

    def _weight(self, entry: TrainerEntry, claimed: int) -> float:
        """A reply's FedAvg weight: its example count, bounded by what the site registered and by the allowlist."""
        if claimed > entry.num_train_examples:
            raise AdapterError(
                f"reply claims {claimed} training examples; site {entry.name} registered {entry.num_train_examples}"
            )
        if self.registry.allowlist is None:
            return float(claimed)
        listed = self.registry.allowlist.sites().get(entry.name)
        if listed is None:
            raise AdapterError(f"site {entry.name} is no longer in --allow-sites")
        return float(min(claimed, listed.max_weight))

    async def _evaluate(self, round_: int, stats: RoundStats) -> None:
        rounds = self.config.rounds
        chosen = sample(self.registry.live(), rounds.fraction_evaluate, 1, seeded(rounds.seed + 1, round_))
        encoded = encode(self.adapter, self._wire_dtype)
        broadcast = Broadcast.of(trainer_pb2.EvaluateRequest, encoded)
        header = trainer_pb2.EvaluateHeader(
            run_id=self.run_id,
            round=round_,
            batch_size=rounds.eval_batch_size,
            max_examples=rounds.eval_max_examples,
            adapter=encoded.manifest,
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
                        lambda e=e: e.client.evaluate(header, broadcast, timeout=rounds.round_timeout, slots=self._slots),
                        lambda reply, p, e=e: accept(e, reply, p),
                    )
                    for e in chosen
                )
            )
        )
