"""A trainer process: serve TrainerService, register with the coordinator, keep a heartbeat."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass

import grpc

from phalanx.codec import DEFAULT_MAX_ADAPTER_BYTES, layout_of, manifest_of
from phalanx.identity import printable
from phalanx.model import ModelConfig
from phalanx.pki import ROLE_SITE
from phalanx.rpc import Server, TlsCredentials, create_channel
from phalanx.telemetry import Telemetry
from phalanx.v1 import coordinator_pb2, coordinator_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from trainer.jobs import LocalWork
from trainer.learners import Learners
from trainer.service import TrainerServicer, WorkLimits

log = logging.getLogger(__name__)

RPC_TIMEOUT_SECONDS = 10.0
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 10.0
# Answers to Register that trying again cannot change: another identity, labels or layout, a bad name.
REFUSALS = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)


def physical_memory() -> int:
    """Bytes of RAM on this machine; 0 where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


@dataclass(frozen=True)
class NodeConfig:
    partition: int
    coordinator: str = "127.0.0.1:50051"
    listen: str = "127.0.0.1:0"
    advertise: str = ""
    """Address the coordinator should call; defaults to the listen host with the bound port."""
    name: str = ""
    """Stable site name; defaults to the name in the certificate, or partition-<k> without TLS."""
    give_up_after: float = 300.0
    """Exit if the coordinator cannot be reached for this many seconds."""
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES
    tls: TlsCredentials | None = None
    """Mutual TLS to and from the coordinator; None is plaintext."""
    limits: WorkLimits = WorkLimits()
    accelerator: str = ""
    """The device the site trains on, as reported at registration ("cpu", "cuda:NAME", "mps")."""
    cores: int = 0
    """Cores the site offers (its --threads), as reported at registration; 0: the machine's."""

    @property
    def site_name(self) -> str:
        if self.tls is not None:
            return self.tls.identity.name
        return self.name or f"partition-{self.partition}"

    def __post_init__(self) -> None:
        if self.tls is None:
            return
        identity = self.tls.identity
        if identity.role != ROLE_SITE:
            raise ValueError(f"--cert is a {identity.role or 'role-less'} certificate, not a site's")
        if self.name and self.name != identity.name:
            raise ValueError(f"--name {printable(self.name)} differs from the certificate's site name {identity.name!r}")


class RegistrationRefused(RuntimeError):
    """The coordinator will not accept this trainer (identity, address, labels or adapter layout)."""


class CoordinatorUnreachable(RuntimeError):
    """The coordinator could not be reached for longer than the configured limit."""


def backoff_delays(first: float = BACKOFF_FIRST_SECONDS, cap: float = BACKOFF_MAX_SECONDS):
    """Randomised exponential back-off: each delay is drawn from [d/2, 3d/2] with d doubling up to cap."""
    delay = first
    while True:
        yield random.uniform(delay / 2, delay * 1.5)
        delay = min(cap, delay * 2)


class TrainerNode:
    def __init__(
        self,
        config: NodeConfig,
        learner: LocalWork,
        telemetry: Telemetry,
        label_names: tuple[str, ...],
        *,
        learners: Learners | None = None,
    ) -> None:
        """`learner` serves the run the site joins at registration; `learners` (holding `learner` as
        its own) serves the runs of a coordinator that serves many; by default only `learner`'s."""
        self.config = config
        self._learner = learner
        self._telemetry = telemetry
        self._label_names = label_names
        self._ended = asyncio.Event()
        self._end_reason = ""
        self._server = Server(telemetry, [trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name], config.tls)
        servicer = TrainerServicer(
            learners or Learners(learner, ModelConfig(num_labels=len(label_names)), label_names),
            telemetry,
            partition=config.partition,
            on_end_run=self.end_run,
            max_adapter_bytes=config.max_adapter_bytes,
            tls=config.tls,
            limits=config.limits,
        )
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, self._server.grpc_server)
        self.servicer = servicer
        self._channel: grpc.aio.Channel | None = None
        self.address = ""

    def end_run(self, reason: str = "") -> None:
        self._end_reason = reason or "finished"
        self._ended.set()

    async def start(self) -> str:
        port = await self._server.start(self.config.listen)
        host = self.config.listen.rsplit(":", 1)[0]
        self.address = self.config.advertise or f"{host}:{port}"
        self._channel = create_channel(self.config.coordinator, self._telemetry, self.config.tls)
        log.info("%s serving on %s", self.config.site_name, self.address)
        return self.address

    async def run(self) -> str:
        """Register and keep a heartbeat until the coordinator ends the run; return its reason."""
        assert self._channel is not None, "start() first"
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)
        heartbeat = asyncio.create_task(self._keep_registered(stub))
        ended = asyncio.create_task(self._ended.wait())
        try:
            done, _ = await asyncio.wait({heartbeat, ended}, return_when=asyncio.FIRST_COMPLETED)
            if heartbeat in done:
                heartbeat.result()  # raises RegistrationRefused / CoordinatorUnreachable
        finally:
            for task in (heartbeat, ended):
                task.cancel()
            await asyncio.gather(heartbeat, ended, return_exceptions=True)
        return self._end_reason

    async def ended(self) -> str:
        """Wait until the run ends (EndRun, a finished heartbeat or a signal); return the reason."""
        await self._ended.wait()
        return self._end_reason

    async def close(self) -> None:
        await self._server.stop()
        if self._channel is not None:
            await self._channel.close()

    def _register_request(self) -> coordinator_pb2.RegisterRequest:
        return coordinator_pb2.RegisterRequest(
            name=self.config.site_name,
            address=self.address,
            partition=self.config.partition,
            num_train_examples=self._learner.num_train_examples,
            num_test_examples=self._learner.num_test_examples,
            label_names=self._label_names,
            adapter_layout=manifest_of(layout_of(self._learner.layout_adapter)),
            capabilities=coordinator_pb2.SiteCapabilities(
                cores=self.config.cores or os.cpu_count() or 0, memory_bytes=physical_memory(), accelerator=self.config.accelerator
            ),
        )

    async def _keep_registered(self, stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
        trainer_id = ""
        interval = 1.0
        delays = backoff_delays()
        last_contact = time.monotonic()
        while True:
            try:
                if not trainer_id:
                    reply = await stub.Register(self._register_request(), timeout=RPC_TIMEOUT_SECONDS)
                    trainer_id, interval = reply.trainer_id, reply.heartbeat_interval_seconds or 1.0
                    self.servicer.join(reply.run_id, reply.last_round)
                    log.info("registered as %s (run %s)", trainer_id, printable(reply.run_id))
                elif time.monotonic() - self.servicer.last_call < interval:
                    pass  # the coordinator's own calls show it this trainer is alive: no heartbeat needed
                else:
                    beat = await stub.Heartbeat(
                        coordinator_pb2.HeartbeatRequest(trainer_id=trainer_id), timeout=RPC_TIMEOUT_SECONDS
                    )
                    if beat.state == coordinator_pb2.RUN_STATE_FINISHED:
                        self.end_run("finished")
                        return
                last_contact = time.monotonic()
                delays = backoff_delays()
                await asyncio.sleep(interval)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in REFUSALS:
                    raise RegistrationRefused(f"{exc.code().name}: {printable(exc.details(), 500)}") from exc
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    log.info("coordinator does not know this trainer; registering again")
                    trainer_id = ""
                    continue
                if time.monotonic() - last_contact > self.config.give_up_after:
                    raise CoordinatorUnreachable(
                        f"no answer from {self.config.coordinator} for {self.config.give_up_after:.0f} s"
                    ) from exc
                delay = next(delays)
                log.warning(
                    "coordinator unreachable (%s: %s); retrying in %.1f s", exc.code().name, printable(exc.details(), 200), delay
                )
                await asyncio.sleep(delay)
