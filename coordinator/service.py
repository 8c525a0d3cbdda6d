"""The CoordinatorService servicer: admission checks, then the registry does the work."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc

from coordinator.registry import Registry
from phalanx.codec import AdapterError, TensorLayout, check_layout, parse_manifest
from phalanx.v1 import coordinator_pb2, coordinator_pb2_grpc


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(
        self,
        registry: Registry,
        *,
        run_id: str,
        label_names: Sequence[str],
        layout: Sequence[TensorLayout],
        heartbeat_interval: float,
        run_state: Callable[[], int],
    ) -> None:
        self._registry = registry
        self._run_id = run_id
        self._labels = tuple(label_names)
        self._layout = tuple(layout)
        self._heartbeat_interval = heartbeat_interval
        self._run_state = run_state

    async def Register(
        self, request: coordinator_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.RegisterResponse:
        if not request.name or not request.address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "register needs a name and an address")
        if tuple(request.label_names) != self._labels:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"label sets differ: trainer has {list(request.label_names)}, run has {list(self._labels)}",
            )
        try:
            check_layout(parse_manifest(request.adapter_layout), self._layout)
        except AdapterError as exc:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"adapter layout differs (model or LoRA settings?): {exc}"
            )
        entry = await self._registry.register(
            name=request.name,
            address=request.address,
            partition=request.partition,
            num_train_examples=request.num_train_examples,
            num_test_examples=request.num_test_examples,
        )
        return coordinator_pb2.RegisterResponse(
            trainer_id=entry.trainer_id, run_id=self._run_id, heartbeat_interval_seconds=self._heartbeat_interval
        )

    async def Heartbeat(
        self, request: coordinator_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.HeartbeatResponse:
        if not self._registry.heartbeat(request.trainer_id):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown trainer id {request.trainer_id!r}; register again")
        return coordinator_pb2.HeartbeatResponse(state=self._run_state())
