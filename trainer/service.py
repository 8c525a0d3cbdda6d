"""The TrainerService servicer: check the caller, decode, check the request, run the local work in a worker thread, encode.

Over TLS only the coordinator (a certificate with its role) is served. Every request must be for
the run this trainer joined at registration, for a round no later than that run's last and not
earlier than one already served, and ask for no more local work than `WorkLimits` allows.
Registered with a coordinator that serves many runs, the trainer serves any run whose RunSpec
it can (`trainer.learners`), keeping those checks per run. Jobs run one at a time, in the order
they arrive, whatever run they belong to.
Secure aggregation's stages (`trainer.secure`) need the site's certificate: it signs the keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc

from phalanx.codec import (
    DEFAULT_MAX_ADAPTER_BYTES,
    Adapter,
    AdapterError,
    TensorLayout,
    check_layout,
    encode,
    layout_of,
    parse_manifest,
)
from phalanx.identity import escaped, printable
from phalanx.model import ffa_lora_a, is_lora_a, without_lora_a
from phalanx.pki import ROLE_COORDINATOR
from phalanx.rpc import TlsCredentials, require_peer
from phalanx.secagg.errors import SecAggError
from phalanx.secagg.messages import MASKED_TENSOR
from phalanx.streams import UNSERVABLE_KEY, discard_rest, expect_end, read_adapter, status_for, status_for_secagg
from phalanx.telemetry import Telemetry
from phalanx.v1 import adapter_pb2, trainer_pb2, trainer_pb2_grpc
from trainer.jobs import EvalOutcome, LocalWork, Stopped, TrainOutcome
from trainer.learners import Learners, Unservable
from trainer.progress import StepReporter
from trainer.secure import SecureRounds

log = logging.getLogger(__name__)
T = TypeVar("T")
Outcome = TypeVar("Outcome", TrainOutcome, EvalOutcome)


JOIN_GRACE_SECONDS = 5.0
"""How long a call that comes before this trainer has heard its Register reply waits for it: the
coordinator may call a site as soon as it has registered it, before the reply reaches the site."""
MAX_RUNS = 256
"""Runs whose latest round a site serving many runs remembers (to refuse replays); older ones are forgotten."""
MAX_RUN_ID_CHARS = 128
DEFAULT_MAX_LOCAL_STEPS = 1_000
DEFAULT_MAX_BATCH_SIZE = 256
MAX_PROXIMAL_MU = 1e3


def federated_layout(spec: trainer_pb2.RunSpec, layout: tuple[TensorLayout, ...]) -> tuple[TensorLayout, ...]:
    """The tensors that travel in `spec`'s run: all of them, or under FFA-LoRA all but lora_A."""
    if spec.lora_variant != trainer_pb2.LORA_VARIANT_FFA:
        return layout
    return tuple(t for t in layout if not is_lora_a(t.name))


def with_frozen_factors(spec: trainer_pb2.RunSpec, adapter: Adapter, learner: LocalWork) -> Adapter:
    """The whole adapter to load: under FFA-LoRA the received tensors plus the run's frozen lora_A."""
    if spec.lora_variant != trainer_pb2.LORA_VARIANT_FFA:
        return adapter
    return {**ffa_lora_a(learner.layout_adapter, spec.ffa_seed), **adapter}


@dataclass(frozen=True)
class WorkLimits:
    """The most local work one request may ask of this site."""

    max_local_steps: int = DEFAULT_MAX_LOCAL_STEPS
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(
        self,
        learners: Learners,
        telemetry: Telemetry,
        *,
        partition: int,
        on_end_run: Callable[[str], None],
        max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
        tls: TlsCredentials | None = None,
        limits: WorkLimits = WorkLimits(),
    ) -> None:
        """With `tls`, serve only callers whose verified certificate has the coordinator's role, and
        take part in secure aggregation, signing with the site's certificate key."""
        self._learners = learners
        self._partition = partition
        self._on_end_run = on_end_run
        self._max_bytes = max_adapter_bytes
        self._secure = tls is not None
        self._secure_rounds = SecureRounds(tls) if tls is not None else None
        self._limits = limits
        self._expected = layout_of(learners.own.layout_adapter)
        # Held by the worker thread, not the event loop: a job whose call was cancelled keeps it
        # until its thread notices the stop flag, so two jobs never share the model.
        self._model_lock = threading.Lock()
        self._turns = asyncio.Lock()  # waiters are woken first come, first served: runs take turns
        self._run_id = ""  # the run joined at registration
        self._serving_many = False  # registered with a coordinator that serves many runs
        self._joined = asyncio.Event()
        self._last_round = 0
        self._latest: OrderedDict[str, int] = OrderedDict()  # highest round asked for, by run
        self.last_call = -math.inf
        """time.monotonic() when a Train or Evaluate call last started or ended."""
        self._tracer = telemetry.tracer()
        meter = telemetry.meter()
        self._examples = meter.create_counter("fl.client.examples", unit="{example}", description="examples processed")
        self._loss = meter.create_histogram("fl.client.loss", description="local training and evaluation loss")

    async def Train(
        self, request_iterator: AsyncIterator[trainer_pb2.TrainRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[trainer_pb2.TrainResponse]:
        range_clipped = 0

        reporter = StepReporter(asyncio.get_running_loop())

        def train(
            header: trainer_pb2.TrainHeader, adapter: Adapter, learner: LocalWork, stop: threading.Event
        ) -> TrainOutcome:
            nonlocal range_clipped
            ffa = header.run.lora_variant == trainer_pb2.LORA_VARIANT_FFA
            outcome = learner.train(
                with_frozen_factors(header.run, adapter, learner),
                steps=header.local_steps,
                batch_size=header.batch_size,
                learning_rate=header.learning_rate,
                seed=header.seed,
                stop=stop,
                batch_order="random" if header.batch_order == trainer_pb2.BATCH_ORDER_RANDOM else "grouped",
                proximal_mu=header.proximal_mu,
                freeze_lora_a=ffa,
                on_step=reporter,
            )
            if ffa:
                outcome = replace(outcome, adapter=without_lora_a(outcome.adapter))
            if not header.HasField("secure_aggregation"):
                return outcome
            assert self._secure_rounds is not None  # checked by begin_secure
            masked = self._secure_rounds.mask(header.run_id, adapter, outcome.adapter, header.secure_aggregation)
            range_clipped = masked.range_clipped
            return replace(outcome, adapter={MASKED_TENSOR: masked.words})

        job = asyncio.ensure_future(self._serve("train", request_iterator, context, train, self._begin_secure))
        try:
            async for report in reporter.reports_until(job):
                yield trainer_pb2.TrainResponse(progress=report)
            header, outcome, learner = await job
        finally:
            job.cancel()  # the call ended first: the job's stop flag is set
        secure = header.HasField("secure_aggregation")
        encoded = encode(
            outcome.adapter,
            wire_dtype=adapter_pb2.DATA_TYPE_UINT32 if secure else header.reply_dtype or adapter_pb2.DATA_TYPE_FLOAT32,
        )
        yield trainer_pb2.TrainResponse(
            result=trainer_pb2.TrainResult(
                run_id=header.run_id,
                round=header.round,
                num_examples=learner.num_train_examples,
                examples_seen=outcome.examples_seen,
                steps=outcome.steps,
                loss=outcome.loss,
                seconds=outcome.seconds,
                adapter=encoded.manifest,
                range_clipped=range_clipped,
            )
        )
        # The coordinator ends its request stream once it has room for this adapter, so replies
        # that finish together do not all wait in its receive buffers.
        await self._end_of_requests(request_iterator, context)
        for chunk in encoded.chunks:
            yield trainer_pb2.TrainResponse(chunk=chunk)

    async def Evaluate(
        self, request_iterator: AsyncIterator[trainer_pb2.EvaluateRequest], context: grpc.aio.ServicerContext
    ) -> trainer_pb2.EvaluateResponse:
        def evaluate(
            header: trainer_pb2.EvaluateHeader, adapter: Adapter, learner: LocalWork, stop: threading.Event
        ) -> EvalOutcome:
            return learner.evaluate(
                with_frozen_factors(header.run, adapter, learner),
                batch_size=header.batch_size or 64,
                max_examples=header.max_examples,
                stop=stop,
            )

        header, outcome, _ = await self._serve("evaluate", request_iterator, context, evaluate)
        await self._end_of_requests(request_iterator, context)
        return trainer_pb2.EvaluateResponse(
            run_id=header.run_id,
            round=header.round,
            num_examples=outcome.num_examples,
            loss=outcome.loss,
            accuracy=outcome.accuracy,
            seconds=outcome.seconds,
        )

    async def EndRun(
        self, request: trainer_pb2.EndRunRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.EndRunResponse:
        await self._check_caller(context)
        await self._check_run(request.run_id, context)
        reason = escaped(request.reason or "finished", 200)
        log.info("coordinator ended the run: %s", reason)
        self._on_end_run(reason)
        return trainer_pb2.EndRunResponse()

    async def AdvertiseKeys(
        self, request: trainer_pb2.AdvertiseKeysRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.AdvertiseKeysResponse:
        rounds = await self._secure_stage(request.round, context)
        run_id = request.round.run_id
        await self._check_round(run_id, request.round.round, None if self._serving_many else self._last_round, context)
        # Two key pairs and a signature: less than a thread hop would cost.
        response = await self._secagg(context, rounds.advertise, request, worker=False)
        self._served(run_id, request.round.round)
        return response

    async def ShareKeys(
        self, request: trainer_pb2.ShareKeysRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.ShareKeysResponse:
        rounds = await self._secure_stage(request.round, context)
        return await self._secagg(context, rounds.share, request)

    async def Unmask(self, request: trainer_pb2.UnmaskRequest, context: grpc.aio.ServicerContext) -> trainer_pb2.UnmaskResponse:
        rounds = await self._secure_stage(request.round, context)
        return await self._secagg(context, rounds.unmask, request, worker=False)  # picks shares out of a dict

    async def _secure_stage(self, round_: trainer_pb2.SecureRound, context: grpc.aio.ServicerContext) -> SecureRounds:
        """Check the caller and run of a secure-aggregation stage; the site's SecureRounds."""
        await self._check_caller(context)
        if self._secure_rounds is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "secure aggregation needs this site's certificate (--ca/--cert/--key): the site signs its keys with it",
            )
        await self._check_run(round_.run_id, context)
        return self._secure_rounds

    async def _begin_secure(self, header: Any, context: grpc.aio.ServicerContext) -> None:
        """Before a securely aggregated job: check its masking parameters and take its shares."""
        if not isinstance(header, trainer_pb2.TrainHeader) or not header.HasField("secure_aggregation"):
            return
        rounds = await self._secure_stage(trainer_pb2.SecureRound(run_id=header.run_id), context)
        await self._secagg(context, rounds.begin, header.run_id, header.round, header.secure_aggregation)

    async def _secagg(
        self, context: grpc.aio.ServicerContext, step: Callable[..., T], *args: Any, worker: bool = True
    ) -> T:
        """Run a secure-aggregation step, in a worker thread unless it is too small to need one;
        abort with the status that names its error."""
        try:
            return await asyncio.to_thread(step, *args) if worker else step(*args)
        except SecAggError as exc:
            log.warning("refused a secure-aggregation step: %s", exc)
            await context.abort(status_for_secagg(exc), str(exc))

    def join(self, run_id: str, last_round: int) -> None:
        """Serve calls for `run_id` (rounds up to `last_round`) from now on; an empty `run_id` serves
        any run (the coordinator serves many). A new run starts its rounds afresh."""
        self._serving_many = not run_id
        if run_id and run_id != self._run_id:
            self._latest.clear()
        self._run_id, self._last_round = run_id, last_round
        self._joined.set()

    async def _serve(
        self,
        phase: str,
        requests: AsyncIterator,
        context: grpc.aio.ServicerContext,
        work: Callable[[Any, Adapter, LocalWork, threading.Event], Outcome],
        prepare: Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]] | None = None,
    ) -> tuple[Any, Outcome, LocalWork]:
        """Receive a header and adapter, check the round, find the learner, `prepare`, run `work` in a
        worker thread; record it all."""
        await self._check_caller(context, requests)
        self.last_call = time.monotonic()
        try:
            with self._tracer.start_as_current_span(f"fl.client.{phase}", attributes={"fl.partition": self._partition}) as span:
                header, adapter = await self._receive(requests, context)
                span.set_attribute("fl.round", header.round)
                await self._check_request(header, context)
                learner = await self._learner_for(header, context)
                if prepare is not None:
                    await prepare(header, context)
                outcome = await self._in_worker(context, lambda stop: work(header, adapter, learner, stop))
                examples = outcome.examples_seen if isinstance(outcome, TrainOutcome) else outcome.num_examples
                span.set_attributes({"fl.examples": examples, "fl.loss": outcome.loss})
                if isinstance(outcome, EvalOutcome):
                    span.set_attribute("fl.accuracy", outcome.accuracy)
                attrs = {"fl.partition": self._partition, "fl.phase": phase}
                self._examples.add(examples, attrs)
                self._loss.record(outcome.loss, attrs)
                return header, outcome, learner
        finally:
            self.last_call = time.monotonic()

    async def _receive(self, requests: AsyncIterator, context: grpc.aio.ServicerContext) -> tuple[Any, Adapter]:
        """The request stream's header and the validated adapter it carries; aborts the call if malformed.

        Reads only until the adapter's bytes are in, leaving the stream open.
        """
        try:
            # The coordinator picks the wire dtype (float32, or float16/bfloat16 for half the bytes).
            header, adapter, _ = await read_adapter(
                requests,
                "header",
                # Serving many runs, the layout is checked against the run's learner once it is known.
                expected=None if self._serving_many else lambda header: federated_layout(header.run, self._expected),
                match_dtype=False,
                max_bytes=self._max_bytes,
                until_complete=True,  # the work starts once the bytes are in; the stream ends later
            )
        except AdapterError as exc:
            log.warning("rejected adapter from coordinator: %s", exc)
            await discard_rest(requests)
            await context.abort(status_for(exc), f"rejected adapter: {exc}")
        return header, adapter

    async def _end_of_requests(self, requests: AsyncIterator, context: grpc.aio.ServicerContext) -> None:
        """Wait for the coordinator to end the request stream; abort the call if anything else comes."""
        try:
            await expect_end(requests, "the adapter")
        except AdapterError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"rejected request: {exc}")

    async def _check_caller(self, context: grpc.aio.ServicerContext, requests: AsyncIterator | None = None) -> None:
        """Over TLS, abort unless the caller's certificate is the coordinator's; before any request is used."""
        if self._secure:
            await require_peer(context, ROLE_COORDINATOR, requests)

    async def _learner_for(self, header: Any, context: grpc.aio.ServicerContext) -> LocalWork:
        """The site's own learner, or the one for the run the header names when serving many runs;
        a run the site cannot serve is FAILED_PRECONDITION, marked so that the run stops asking."""
        if not self._serving_many:
            return self._learners.own
        if not header.HasField("run"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request names no run spec (model and labels)")
        try:
            config = self._learners.config_for(header.run)
            learner = await self._in_worker(context, lambda stop: self._learners.get(config))
            check_layout(
                parse_manifest(header.adapter), federated_layout(header.run, layout_of(learner.layout_adapter)), match_dtype=False
            )
        except Unservable as exc:
            log.warning("refused run %s: %s", printable(header.run_id), exc)
            context.set_trailing_metadata(((UNSERVABLE_KEY, "1"),))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot serve this run: {exc}")
        except AdapterError as exc:
            await context.abort(status_for(exc), f"rejected adapter: {exc}")
        return learner

    async def _check_run(self, run_id: str, context: grpc.aio.ServicerContext) -> None:
        if not self._joined.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._joined.wait(), JOIN_GRACE_SECONDS)
        if not self._joined.is_set():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this trainer has not joined a run yet")
        if self._serving_many:
            if not 0 < len(run_id) <= MAX_RUN_ID_CHARS:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a run id has 1-{MAX_RUN_ID_CHARS} characters")
            return
        if run_id != self._run_id:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the request is for run {printable(run_id)}; this trainer is in run {self._run_id}",
            )

    async def _check_request(self, header: Any, context: grpc.aio.ServicerContext) -> None:
        """Refuse another run, a round past the run's last or before one already served (a replay), and too much work."""
        await self._check_run(header.run_id, context)
        last_round = header.run.last_round if self._serving_many else self._last_round
        await self._check_round(header.run_id, header.round, last_round, context)
        limits = self._limits
        problems = []
        training = isinstance(header, trainer_pb2.TrainHeader)
        if header.batch_size > limits.max_batch_size or (training and header.batch_size < 1):
            problems.append(f"batch size {header.batch_size} is outside 1-{limits.max_batch_size} (--max-batch-size)")
        if training:
            if not 1 <= header.local_steps <= limits.max_local_steps:
                problems.append(f"{header.local_steps} local steps is outside 1-{limits.max_local_steps} (--max-local-steps)")
            if not (math.isfinite(header.learning_rate) and header.learning_rate > 0):
                problems.append(f"learning rate {header.learning_rate} is not a positive number")
            if not (math.isfinite(header.proximal_mu) and 0 <= header.proximal_mu <= MAX_PROXIMAL_MU):
                problems.append(f"proximal mu {header.proximal_mu} is outside 0-{MAX_PROXIMAL_MU}")
        if problems:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused local work: " + "; ".join(problems))
        self._served(header.run_id, header.round)

    async def _check_round(
        self, run_id: str, round_: int, last_round: int | None, context: grpc.aio.ServicerContext
    ) -> None:
        """Refuse a round past the run's last (when known), or before one already served (a replay)."""
        if last_round is not None and round_ > last_round:
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE, f"round {round_} is past the last round ({last_round}) of run {escaped(run_id, MAX_RUN_ID_CHARS)}"
            )
        latest = self._latest.get(run_id, 0)
        if round_ < latest:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"round {round_} of run {escaped(run_id, MAX_RUN_ID_CHARS)} is closed: this trainer has already served round {latest}",
            )

    def _served(self, run_id: str, round_: int) -> None:
        """Remember the latest round asked of `run_id`, for the most recent MAX_RUNS runs."""
        self._latest[run_id] = round_
        self._latest.move_to_end(run_id)
        while len(self._latest) > MAX_RUNS:
            self._latest.popitem(last=False)

    async def _in_worker(self, context: grpc.aio.ServicerContext, job: Callable[[threading.Event], T]) -> T:
        """Run `job` in a worker thread, one at a time; a cancelled call sets its stop flag."""
        stop = threading.Event()

        def locked() -> T:
            with self._model_lock:
                return job(stop)

        try:
            async with self._turns:
                return await asyncio.to_thread(locked)
        except asyncio.CancelledError:
            stop.set()
            raise
        except Stopped:
            await context.abort(grpc.StatusCode.CANCELLED, "job stopped")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
