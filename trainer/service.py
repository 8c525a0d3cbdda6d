"""The TrainerService servicer: decode, run the learner in a worker thread, encode."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import grpc

from phalanx.codec import DEFAULT_MAX_ADAPTER_BYTES, AdapterError, EncodedAdapter, check_finite, encode, layout_of
from phalanx.streams import read_adapter, status_for
from phalanx.telemetry import Telemetry
from phalanx.v1 import adapter_pb2, trainer_pb2, trainer_pb2_grpc
from trainer.learner import Learner, Stopped

log = logging.getLogger(__name__)
T = TypeVar("T")


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(
        self,
        learner: Learner,
        telemetry: Telemetry,
        *,
        partition: int,
        on_end_run: Callable[[str], None],
        max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
    ) -> None:
        self._learner = learner
        self._partition = partition
        self._on_end_run = on_end_run
        self._max_bytes = max_adapter_bytes
        self._expected = layout_of(learner.layout_adapter)
        # Held by the worker thread, not the event loop: a job whose call was cancelled keeps it
        # until its thread notices the stop flag, so two jobs never share the model.
        self._model_lock = threading.Lock()
        self._tracer = telemetry.tracer()
        meter = telemetry.meter()
        self._examples = meter.create_counter("fl.client.examples", unit="{example}", description="examples processed")
        self._loss = meter.create_histogram("fl.client.loss", description="local training and evaluation loss")

    async def Train(
        self, request_iterator: AsyncIterator[trainer_pb2.TrainRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[trainer_pb2.TrainResponse]:
        result, encoded = await self._train(request_iterator, context)
        yield trainer_pb2.TrainResponse(result=result)
        for chunk in encoded.chunks:
            yield trainer_pb2.TrainResponse(chunk=chunk)

    async def _train(
        self, requests: AsyncIterator[trainer_pb2.TrainRequest], context: grpc.aio.ServicerContext
    ) -> tuple[trainer_pb2.TrainResult, EncodedAdapter]:
        with self._tracer.start_as_current_span("fl.client.train", attributes={"fl.partition": self._partition}) as span:
            header, adapter = await self._receive(requests, context)
            span.set_attribute("fl.round", header.round)
            reply_dtype = header.reply_dtype or adapter_pb2.DATA_TYPE_FLOAT32
            outcome = await self._in_worker(
                context,
                lambda stop: self._learner.train(
                    adapter,
                    steps=header.local_steps,
                    batch_size=header.batch_size,
                    learning_rate=header.learning_rate,
                    seed=header.seed,
                    stop=stop,
                ),
            )
            span.set_attributes({"fl.examples": outcome.examples_seen, "fl.loss": outcome.loss})
            attrs = {"fl.partition": self._partition, "fl.phase": "train"}
            self._examples.add(outcome.examples_seen, attrs)
            self._loss.record(outcome.loss, attrs)
            encoded = encode(outcome.adapter, wire_dtype=reply_dtype)
            result = trainer_pb2.TrainResult(
                run_id=header.run_id,
                round=header.round,
                num_examples=len(self._learner.train_split),
                examples_seen=outcome.examples_seen,
                steps=outcome.steps,
                loss=outcome.loss,
                seconds=outcome.seconds,
                adapter=encoded.manifest,
            )
            return result, encoded

    async def Evaluate(
        self, request_iterator: AsyncIterator[trainer_pb2.EvaluateRequest], context: grpc.aio.ServicerContext
    ) -> trainer_pb2.EvaluateResponse:
        with self._tracer.start_as_current_span(
            "fl.client.evaluate", attributes={"fl.partition": self._partition}
        ) as span:
            header, adapter = await self._receive(request_iterator, context)
            span.set_attribute("fl.round", header.round)
            outcome = await self._in_worker(
                context,
                lambda stop: self._learner.evaluate(
                    adapter, batch_size=header.batch_size or 64, max_examples=header.max_examples, stop=stop
                ),
            )
            span.set_attributes(
                {"fl.examples": outcome.num_examples, "fl.loss": outcome.loss, "fl.accuracy": outcome.accuracy}
            )
            attrs = {"fl.partition": self._partition, "fl.phase": "evaluate"}
            self._examples.add(outcome.num_examples, attrs)
            self._loss.record(outcome.loss, attrs)
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
        log.info("coordinator ended the run: %s", request.reason or "finished")
        self._on_end_run(request.reason)
        return trainer_pb2.EndRunResponse()

    async def _receive(self, requests: AsyncIterator, context: grpc.aio.ServicerContext):
        """The request stream's header and the validated adapter it carries; aborts the call if malformed."""
        try:
            header, adapter, _ = await read_adapter(
                requests, "header", expected=self._expected, max_bytes=self._max_bytes
            )
            check_finite(adapter)
        except AdapterError as exc:
            log.warning("rejected adapter from coordinator: %s", exc)
            await context.abort(status_for(exc), f"rejected adapter: {exc}")
        return header, adapter

    async def _in_worker(self, context: grpc.aio.ServicerContext, job: Callable[[threading.Event], T]) -> T:
        """Run `job` in a worker thread, one at a time; a cancelled call sets its stop flag."""
        stop = threading.Event()

        def locked() -> T:
            with self._model_lock:
                return job(stop)

        try:
            return await asyncio.to_thread(locked)
        except asyncio.CancelledError:
            stop.set()
            raise
        except Stopped:
            await context.abort(grpc.StatusCode.CANCELLED, "job stopped")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
