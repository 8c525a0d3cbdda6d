"""The federation: what outlives any one run.

It keeps the sites (the registry, their liveness and channels), the transfer slots every run's
adapters share, and the gRPC server. Runs (`coordinator.run.Run`) are hosted by it: the one-shot
command is a federation with one run (`coordinator.app`), a serving coordinator one with many
(`coordinator.serving`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from coordinator.allowlist import Allowlist
from coordinator.config import FederationConfig
from coordinator.registry import Registry
from coordinator.run import RoundInstruments
from coordinator.service import CoordinatorServicer
from phalanx.codec import TensorLayout
from phalanx.rpc import Server
from phalanx.secagg.keys import Verifier
from phalanx.telemetry import Telemetry
from phalanx.v1 import coordinator_pb2, coordinator_pb2_grpc

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name
END_RUN_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Admission:
    """A federation for a single run (or a series of runs alike): sites join at registration, with its labels and layout."""

    run_id: str
    last_round: int
    label_names: tuple[str, ...]
    layout: tuple[TensorLayout, ...]
    mixed_ranks: bool = False
    """Sites may register adapters of another LoRA rank than the run's."""


class Federation:
    def __init__(
        self,
        config: FederationConfig,
        telemetry: Telemetry,
        *,
        state: Callable[[], int],
        admission: Admission | None = None,
        services: Sequence[str] = (),
    ) -> None:
        """`state`: the run state heartbeats report. `admission`: the one run sites join at registration
        (with an empty run id: the runs of a series, each named in its calls); None for a federation that
        serves many runs. `services`: names of more services added to `server`."""
        self.config = config
        self.serves_many = admission is None or not admission.run_id
        self.registry = Registry(
            telemetry,
            config.liveness_timeout,
            tls=config.tls,
            limits=config.registry,
            allowlist=Allowlist(config.allow_sites) if config.allow_sites is not None else None,
        )
        self.slots = asyncio.Semaphore(config.max_transfers)
        self.verifier = Verifier(config.tls.ca) if config.tls is not None else None
        self.tracer = telemetry.tracer()
        self.instruments = RoundInstruments.create(telemetry.meter())
        self.server = Server(telemetry, [SERVICE_NAME, *services], config.tls)
        coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(
            CoordinatorServicer(
                self.registry,
                admission=admission,
                heartbeat_interval=config.heartbeat_interval,
                run_state=state,
                secure=config.tls is not None,
                insecure_remote=config.insecure,
            ),
            self.server.grpc_server,
        )
        self.address = ""

    async def start(self) -> str:
        """Serve on config.listen; return the address trainers should use."""
        port = await self.server.start(self.config.listen)
        self.address = f"{self.config.listen.rsplit(':', 1)[0]}:{port}"
        return self.address

    def drain(self) -> None:
        """Report NOT_SERVING at once, so orchestrators look elsewhere, while calls are still answered."""
        asyncio.get_running_loop().create_task(self.server.drain())

    async def close(self, end_run: tuple[str, str] | None = None) -> None:
        """Stop serving and close the channels; with `end_run` (run id, reason), first tell every site that run is over."""
        if end_run is not None:
            await asyncio.gather(
                *(e.client.end_run(*end_run, timeout=END_RUN_TIMEOUT_SECONDS) for e in self.registry.all()),
                return_exceptions=True,
            )
        await self.server.stop()
        await self.registry.close()
