"""An in-process coordinator and echo trainers on loopback, for fault and load tests.

Everything is the real server and client code; only the trainers' local work is the echo
learner, so a round costs milliseconds and a test can put faults exactly where it wants them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from coordinator.app import CoordinatorApp
from coordinator.config import CoordinatorConfig, RoundConfig
from coordinator.outputs import RunOutputs
from coordinator.registry import RegistryLimits
from phalanx.codec import DEFAULT_MAX_ADAPTER_BYTES, Adapter, layout_of, manifest_of
from phalanx.model import ModelConfig
from phalanx.rpc import Server, TlsCredentials, create_channel
from phalanx.telemetry import Telemetry
from phalanx.v1 import coordinator_pb2, coordinator_pb2_grpc, trainer_pb2_grpc
from trainer.echo import EchoLearner, synthetic_adapter
from trainer.node import NodeConfig, TrainerNode
from trainer.service import WorkLimits

LABELS = ("negative", "neutral", "positive")
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Coordinator:
    app: CoordinatorApp
    telemetry: Telemetry
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    initial: dict[str, np.ndarray]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.app.address

    def clients_counted(self) -> dict[tuple[str, str, str], int]:
        """fl.round.clients totals by (phase, status, gRPC code)."""
        totals: dict[tuple[str, str, str], int] = {}
        for rm in self.metrics.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == "fl.round.clients":
                        for point in metric.data.data_points:
                            a = point.attributes
                            key = (a["fl.phase"], a["fl.status"], a["rpc.grpc.status_code"])
                            totals[key] = totals.get(key, 0) + point.value
        return totals

    def round_events(self, round_: int) -> list[dict[str, Any]]:
        return [
            {"name": e.name, **e.attributes}
            for s in self.spans.get_finished_spans()
            if s.name == "fl.round" and s.attributes["fl.round"] == round_
            for e in s.events
        ]

    async def close(self) -> None:
        await self.app.close("finished")
        self.telemetry.shutdown()


async def start_coordinator(
    tmp_path: Path,
    *,
    params: int = 1_000,
    start_with: int = 2,
    liveness_timeout: float = 10.0,
    heartbeat_interval: float = CoordinatorConfig.heartbeat_interval,
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
    max_transfers: int = CoordinatorConfig.max_transfers,
    transfer_timeout: float = CoordinatorConfig.transfer_timeout,
    keep_spans: bool = True,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    tls: TlsCredentials | None = None,
    allow_sites: Path | None = None,
    registry: RegistryLimits = RegistryLimits(),
    initial: dict[str, np.ndarray] | None = None,
    model: ModelConfig | None = None,
    **round_settings: Any,
) -> Coordinator:
    """A coordinator of one run over `initial` (default: a synthetic adapter of `params` values)."""
    round_settings.setdefault("rounds", 1)
    round_settings.setdefault("min_trainers", 2)
    round_settings.setdefault("round_timeout", 30.0)
    spans, metrics = InMemorySpanExporter(), InMemoryMetricReader()
    # keep_spans=False records spans without keeping them, as a coordinator with no exporter does.
    telemetry = Telemetry.create("phalanx-coordinator", span_exporter=spans if keep_spans else None, metric_readers=[metrics])
    config = CoordinatorConfig(
        rounds=RoundConfig(**round_settings),
        model=model or ModelConfig(),
        label_names=LABELS,
        listen="127.0.0.1:0",
        out=tmp_path,
        start_with=start_with,
        register_timeout=60.0,
        liveness_timeout=liveness_timeout,
        heartbeat_interval=heartbeat_interval,
        max_adapter_bytes=max_adapter_bytes,
        max_transfers=max_transfers,
        transfer_timeout=transfer_timeout,
        tls=tls,
        allow_sites=allow_sites,
        registry=registry,
    )
    initial = initial if initial is not None else synthetic_adapter(params)
    coordinator: Coordinator

    def record(row: dict[str, Any]) -> None:
        coordinator.rows.append(row)
        if on_round is not None:
            on_round(row)

    app = CoordinatorApp(config, telemetry, RunOutputs(tmp_path), initial, run_id="run-1", on_round=record)
    coordinator = Coordinator(app, telemetry, spans, metrics, initial)
    await app.start()
    return coordinator


@dataclass
class EchoSite:
    node: TrainerNode
    learner: EchoLearner
    task: asyncio.Task


async def start_echo_site(
    coordinator: str,
    partition: int,
    *,
    params: int = 1_000,
    delay: float = 0.0,
    advertise: str = "",
    listen: str = "127.0.0.1:0",
    tls: TlsCredentials | None = None,
    limits: WorkLimits = WorkLimits(),
    register: bool = True,
    shift: float = 0.0,
    num_train: int = 100,
    learner: EchoLearner | None = None,
    cores: int = 0,
) -> EchoSite:
    """An echo trainer node (adding `shift` to what it trains, or the `learner` given); with
    `register=False` it only serves, as a member of run "run-1" of 10 rounds."""
    learner = learner or EchoLearner(synthetic_adapter(params), delay=delay, shift=shift, num_train=num_train)
    name = tls.identity.name if tls is not None else f"echo-{partition}"
    node = TrainerNode(
        NodeConfig(
            partition=partition, coordinator=coordinator, listen=listen, advertise=advertise, name=name, tls=tls,
            limits=limits, cores=cores,
        ),
        learner,
        Telemetry.create("phalanx-trainer"),
        LABELS,
    )
    await node.start()
    if not register:
        node.servicer.join("run-1", last_round=10)
        return EchoSite(node, learner, asyncio.create_task(node.ended()))
    return EchoSite(node, learner, asyncio.create_task(node.run()))


async def start_servicer_site(
    coordinator: str,
    name: str,
    servicer: trainer_pb2_grpc.TrainerServiceServicer,
    layout: Adapter,
    partition: int = 9,
    tls: TlsCredentials | None = None,
    num_train_examples: int = 100,
    capabilities: coordinator_pb2.SiteCapabilities | None = None,
) -> Server:
    """A gRPC server answering TrainerService with `servicer`, registered with the coordinator as `name`."""
    telemetry = Telemetry.create(name)
    server = Server(telemetry, [], tls)
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, server.grpc_server)
    port = await server.start("127.0.0.1:0")
    async with create_channel(coordinator, telemetry, tls) as channel:
        await coordinator_pb2_grpc.CoordinatorServiceStub(channel).Register(
            coordinator_pb2.RegisterRequest(
                name=name, address=f"127.0.0.1:{port}", partition=partition, num_train_examples=num_train_examples,
                num_test_examples=10, label_names=LABELS, adapter_layout=manifest_of(layout_of(layout)),
                capabilities=capabilities,
            )  # fmt: skip
        )
    return server


async def run_with_rogue(
    coordinator: Coordinator, rogue: trainer_pb2_grpc.TrainerServiceServicer, *, params: int, echoes: int = 2
) -> list[dict[str, Any]]:
    """Run the coordinator's rounds with `echoes` honest echo trainers and one site named "rogue"; close all after."""
    sites = [await start_echo_site(coordinator.address, k, params=params) for k in range(echoes)]
    server = await start_servicer_site(coordinator.address, "rogue", rogue, coordinator.initial)
    try:
        return await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        await server.stop(0)
        await coordinator.close()


async def stop_sites(sites: list[EchoSite]) -> None:
    for site in sites:
        site.node.end_run("test over")
    await asyncio.gather(*(s.task for s in sites), return_exceptions=True)
    await asyncio.gather(*(s.node.close() for s in sites))


def start_echo_process(coordinator: str, *, first_partition: int, params: int, count: int = 1, **flags: Any) -> subprocess.Popen:
    """`python -m trainer.echo` as a child process; flags are passed as --key value."""
    argv = [
        sys.executable, "-m", "trainer.echo", "--coordinator", coordinator, "--count", str(count),
        "--first-partition", str(first_partition), "--params", str(params),
    ]  # fmt: skip
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return subprocess.Popen(argv, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)


async def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)


def kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
