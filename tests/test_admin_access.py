"""Who may use a serving coordinator's admin API and HTTP status, and how submitted configurations are checked."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from coordinator.admin import AdminAccess, RunServicer
from coordinator.config import FederationConfig
from coordinator.http import OPENAPI, StatusServer
from coordinator.run_config import RunConfigError, parse_run_toml
from coordinator.serving import ServingCoordinator
from phalanx.rpc import TlsCredentials, create_channel
from phalanx.telemetry import Telemetry
from phalanx.v1 import run_pb2, run_pb2_grpc
from tests.certs import Pki

# Never reached: nothing registers, so a submitted run waits for sites until it is stopped.
RUN = 'rounds = 2\nmin-trainers = 1\nlabels = "a,b"\nregister-timeout = 600.0\n'


async def start(tmp_path: Path, tls: TlsCredentials | None, listen: str = "127.0.0.1:0", *, insecure: bool = False):
    telemetry = Telemetry.create("phalanx-coordinator")
    coordinator = ServingCoordinator(
        FederationConfig(listen=listen, tls=tls, insecure=insecure), telemetry, tmp_path / "state", can_sign=tls is not None
    )
    access = AdminAccess(tls=tls is not None, loopback_only=listen.startswith("127."))
    run_pb2_grpc.add_RunServiceServicer_to_server(RunServicer(coordinator, access), coordinator.federation.server.grpc_server)
    address = await coordinator.start()
    status = StatusServer(coordinator, access, tls)
    url = await status.start("127.0.0.1:0")
    return coordinator, status, address, url, telemetry


def fetch(url: str, context: ssl.SSLContext | None = None) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def client_context(pki: Pki, name: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.directory / "ca.pem"))
    context.check_hostname = False  # the coordinator's certificate names its hosts, checked by the CA chain here
    if name is not None:
        context.load_cert_chain(pki.directory / f"{name}.pem", pki.directory / f"{name}.key")
    return context


async def test_tls_coordinator_serves_admins_only(tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="coordinator")
    coordinator, status, address, url, telemetry = await start(tmp_path, pki.creds("coordinator"))
    try:
        assert url.startswith("https://")
        code, body = await asyncio.to_thread(fetch, url + "/runs", client_context(pki, None))
        assert code == 401 and "client certificate" in body["error"]
        code, body = await asyncio.to_thread(fetch, url + "/runs", client_context(pki, "site-a"))
        assert code == 403 and "site 'site-a'" in body["error"]
        for name, expected in (("site-a", grpc.StatusCode.PERMISSION_DENIED),):
            async with create_channel(address, telemetry, pki.creds(name)) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await run_pb2_grpc.RunServiceStub(channel).ListRuns(run_pb2.ListRunsRequest())
                assert refused.value.code() == expected
        async with create_channel(address, telemetry, pki.creds("admin")) as channel:
            stub = run_pb2_grpc.RunServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.SubmitRun(run_pb2.SubmitRunRequest(config_toml="rounds = 0\n"))
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--rounds must be at least 1" in bad.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetRun(run_pb2.GetRunRequest(run_id="nope"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            submitted = (await stub.SubmitRun(run_pb2.SubmitRunRequest(config_toml=RUN))).run
            assert submitted.status in (run_pb2.RUN_STATUS_PENDING, run_pb2.RUN_STATUS_RUNNING)
            code, runs = await asyncio.to_thread(fetch, url + "/runs", client_context(pki, "admin"))
            assert code == 200 and [(r["id"], r["state"]) for r in runs] == [(submitted.id, "running")]
            code, run = await asyncio.to_thread(fetch, f"{url}/runs/{submitted.id}", client_context(pki, "admin"))
            assert code == 200 and run["config"] == RUN and run["rounds"] == 2
            stopped = (await stub.StopRun(run_pb2.StopRunRequest(run_id=submitted.id))).run
            assert stopped.status == run_pb2.RUN_STATUS_STOPPED and stopped.reason == "stopped by an admin"
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await stub.StopRun(run_pb2.StopRunRequest(run_id=submitted.id))
            assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            events = [e async for e in stub.StreamRun(run_pb2.StreamRunRequest(run_id=submitted.id, follow=True))]
            assert events[-1].run.status == run_pb2.RUN_STATUS_STOPPED
            assert any("stopped by an admin" in e.log_line for e in events)
        code, body = await asyncio.to_thread(fetch, url + "/status", client_context(pki, "admin"))
        assert code == 200 and body["runs"]["stopped"] == 1 and body["sites_registered"] == 0
        code, body = await asyncio.to_thread(fetch, f"{url}/runs/{submitted.id}/metrics", client_context(pki, "admin"))
        assert code == 200 and body == []
        code, body = await asyncio.to_thread(fetch, url + "/openapi.json", client_context(pki, "admin"))
        assert code == 200 and body == OPENAPI and set(body["paths"]) >= {"/status", "/runs", "/runs/{run_id}", "/sites"}
    finally:
        await status.close()
        await coordinator.close()
        telemetry.shutdown()


async def test_plaintext_coordinator_answers_only_on_loopback(tmp_path: Path) -> None:
    coordinator, status, address, url, telemetry = await start(tmp_path, None)
    try:
        code, body = await asyncio.to_thread(fetch, url + "/sites")
        assert code == 200 and body == []
        async with create_channel(address, telemetry) as channel:
            assert (await run_pb2_grpc.RunServiceStub(channel).ListRuns(run_pb2.ListRunsRequest())).runs == []
    finally:
        await status.close()
        await coordinator.close()
        telemetry.shutdown()
    coordinator, status, address, url, telemetry = await start(tmp_path / "open", None, "0.0.0.0:0", insecure=True)
    try:
        code, body = await asyncio.to_thread(fetch, url + "/runs")
        assert code == 403 and "admin certificate" in body["error"]
        async with create_channel(f"127.0.0.1:{address.rsplit(':', 1)[1]}", telemetry) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await run_pb2_grpc.RunServiceStub(channel).ListRuns(run_pb2.ListRunsRequest())
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await status.close()
        await coordinator.close()
        telemetry.shutdown()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rounds = [", "not TOML"),
        ("listen = '0.0.0.0:1'", "unknown run option 'listen'"),
        ("rounds = 'five'", "rounds must be an integer"),
        ("aggregator = 'mean'", "aggregator must be one of"),
        ("deterministic = 1", "deterministic must be true or false"),
        ("secure-aggregation = true", "secure aggregation needs certificates"),
        ("dp-noise-multiplier = 1.0", "needs --clip-norm"),
        ("x" * 70_000, "larger than"),
    ],
)
def test_run_configuration_is_checked_key_by_key(text: str, message: str) -> None:
    with pytest.raises(RunConfigError, match=message):
        parse_run_toml(text, can_sign=False)


def test_run_configuration_takes_the_run_flags() -> None:
    args = parse_run_toml("rounds = 3\nlr = 1\nlocal-steps = 4\nmodel = 'm'\ndeterministic = true\n", can_sign=False)
    assert (args.rounds, args.lr, args.local_steps, args.model, args.deterministic) == (3, 1.0, 4, "m", True)
    assert isinstance(args.lr, float) and args.aggregator == "fedavg"
