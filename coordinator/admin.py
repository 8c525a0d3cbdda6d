"""RunService: the admin API of a serving coordinator. Thin: checks the caller, then asks `ServingCoordinator`.

Callers need a certificate with the admin role from the federation's CA. A coordinator without
certificates that listens on loopback only answers any caller, like a local development server
(anyone who can reach a loopback port is already on this machine).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc

from coordinator.run_config import MAX_CONFIG_BYTES, RunConfigError
from coordinator.serving import Event, RunFinished, RunNotFound, ServingCoordinator
from coordinator.store import FINISHED_STATES, RunRecord
from phalanx.identity import printable
from phalanx.pki import ROLE_ADMIN
from phalanx.rpc import require_peer
from phalanx.v1 import run_pb2, run_pb2_grpc

MAX_RUN_ID_CHARS = 64
STATUSES = {
    "pending": run_pb2.RUN_STATUS_PENDING,
    "running": run_pb2.RUN_STATUS_RUNNING,
    "completed": run_pb2.RUN_STATUS_COMPLETED,
    "failed": run_pb2.RUN_STATUS_FAILED,
    "stopped": run_pb2.RUN_STATUS_STOPPED,
}


def run_info(record: RunRecord) -> run_pb2.RunInfo:
    return run_pb2.RunInfo(
        id=record.id,
        status=STATUSES[record.state],
        reason=record.reason,
        rounds=record.rounds,
        completed_rounds=record.completed_rounds,
        created=record.created,
        started=record.started or 0.0,
        finished=record.finished or 0.0,
        out=record.out,
    )


class AdminAccess:
    """Who may call the admin API: admin certificates with TLS; anyone on a plaintext loopback-only coordinator."""

    def __init__(self, *, tls: bool, loopback_only: bool) -> None:
        self.tls = tls
        self.open = not tls and loopback_only

    async def check(self, context: grpc.aio.ServicerContext) -> None:
        if self.tls:
            await require_peer(context, ROLE_ADMIN)
        elif not self.open:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "admin calls need an admin certificate: this coordinator listens off loopback without TLS",
            )


class RunServicer(run_pb2_grpc.RunServiceServicer):
    def __init__(self, coordinator: ServingCoordinator, access: AdminAccess) -> None:
        self._coordinator = coordinator
        self._access = access

    async def SubmitRun(self, request: run_pb2.SubmitRunRequest, context: grpc.aio.ServicerContext) -> run_pb2.SubmitRunResponse:
        await self._access.check(context)
        if len(request.config_toml) > MAX_CONFIG_BYTES:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the run configuration is larger than {MAX_CONFIG_BYTES} bytes")
        try:
            record = await self._coordinator.submit(request.config_toml)
        except RunConfigError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad run configuration: {exc}")
        return run_pb2.SubmitRunResponse(run=run_info(record))

    async def ListRuns(self, request: run_pb2.ListRunsRequest, context: grpc.aio.ServicerContext) -> run_pb2.ListRunsResponse:
        await self._access.check(context)
        return run_pb2.ListRunsResponse(runs=[run_info(r) for r in await self._coordinator.list()])

    async def GetRun(self, request: run_pb2.GetRunRequest, context: grpc.aio.ServicerContext) -> run_pb2.GetRunResponse:
        await self._access.check(context)
        record = await self._record(request.run_id, context)
        return run_pb2.GetRunResponse(run=run_info(record), config_toml=record.config)

    async def StopRun(self, request: run_pb2.StopRunRequest, context: grpc.aio.ServicerContext) -> run_pb2.StopRunResponse:
        await self._access.check(context)
        await self._record(request.run_id, context)
        try:
            record = await self._coordinator.stop(request.run_id)
        except RunFinished as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return run_pb2.StopRunResponse(run=run_info(record))

    async def StreamRun(
        self, request: run_pb2.StreamRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[run_pb2.StreamRunResponse]:
        await self._access.check(context)
        run_id = request.run_id
        await self._record(run_id, context)
        events = self._coordinator.events
        queue = events.subscribe(run_id)  # before reading the backlog, so nothing falls between the two
        try:
            store = self._coordinator.store
            rows = await asyncio.to_thread(store.rows, run_id)
            lines = await asyncio.to_thread(store.logs, run_id)
            for row in rows:
                yield run_pb2.StreamRunResponse(row_json=json.dumps(row))
            for _, line in lines:
                yield run_pb2.StreamRunResponse(log_line=line)
            record = await self._record(run_id, context)
            next_row, last_line = len(rows), lines[-1][0] if lines else 0
            while request.follow and record.state not in FINISHED_STATES:
                event: Event = await queue.get()
                if event.kind == "overflow":
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the stream fell too far behind the run")
                if event.kind == "row" and event.index >= next_row and event.row is not None:
                    next_row = event.index + 1
                    yield run_pb2.StreamRunResponse(row_json=json.dumps(event.row))
                elif event.kind == "log" and event.index > last_line:
                    last_line = event.index
                    yield run_pb2.StreamRunResponse(log_line=event.line)
                elif event.kind == "state" and event.record is not None:
                    record = event.record
            await self._coordinator.flush_logs()
            for _, line in await asyncio.to_thread(store.logs, run_id, last_line):  # the run's last moments
                yield run_pb2.StreamRunResponse(log_line=line)
            yield run_pb2.StreamRunResponse(run=run_info(record))
        finally:
            events.unsubscribe(run_id, queue)

    async def _record(self, run_id: str, context: grpc.aio.ServicerContext) -> RunRecord:
        if not 0 < len(run_id) <= MAX_RUN_ID_CHARS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a run id has 1-{MAX_RUN_ID_CHARS} characters")
        try:
            return await self._coordinator.get(run_id)
        except RunNotFound:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no run {printable(run_id)}")
