"""The coordinator's server, registry and round loop, started and stopped together."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from coordinator.allowlist import Allowlist
from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from coordinator.outputs import RunOutputs
from coordinator.registry import Registry
from coordinator.service import CoordinatorServicer
from phalanx.codec import Adapter, layout_of
from phalanx.rpc import Server
from phalanx.telemetry import Telemetry
from phalanx.v1 import coordinator_pb2, coordinator_pb2_grpc

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name
END_RUN_TIMEOUT_SECONDS = 5.0


class CoordinatorApp:
    def __init__(
        self,
        config: CoordinatorConfig,
        telemetry: Telemetry,
        outputs: RunOutputs,
        initial: Adapter,
        *,
        run_id: str,
        start_round: int = 1,
        on_round: Callable[[dict[str, Any]], None] = lambda row: None,
        resumed: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.registry = Registry(
            telemetry,
            config.liveness_timeout,
            tls=config.tls,
            limits=config.registry,
            allowlist=Allowlist(config.allow_sites) if config.allow_sites is not None else None,
        )
        self.federation = Federation(
            config, self.registry, telemetry, outputs, initial, run_id=run_id, start_round=start_round, on_round=on_round,
            resumed=resumed,
        )  # fmt: skip
        self.server = Server(telemetry, [SERVICE_NAME], config.tls)
        coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(
            CoordinatorServicer(
                self.registry,
                run_id=run_id,
                last_round=config.rounds.rounds,
                label_names=config.label_names,
                layout=layout_of(initial),
                heartbeat_interval=config.heartbeat_interval,
                run_state=lambda: self.federation.state,
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

    async def run(self) -> list[dict[str, Any]]:
        return await self.federation.run()

    @property
    def waiting_for_trainers(self) -> bool:
        return self.federation.state == coordinator_pb2.RUN_STATE_WAITING

    def stop_after_round(self) -> None:
        """Report NOT_SERVING at once, so orchestrators look elsewhere; end the run after the round in flight."""
        asyncio.get_running_loop().create_task(self.server.drain())
        self.federation.stop_after_round()

    async def close(self, reason: str) -> None:
        """Tell every trainer the run is over, then stop serving and close the channels."""
        self.federation.state = coordinator_pb2.RUN_STATE_FINISHED  # heartbeats now say so too
        await asyncio.gather(
            *(
                e.client.end_run(self.federation.run_id, reason, timeout=END_RUN_TIMEOUT_SECONDS)
                for e in self.registry.all()
            ),
            return_exceptions=True,
        )
        await self.server.stop()
        await self.registry.close()
