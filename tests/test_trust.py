"""Trust across organisations: each attack on an open federation, now refused with the status that names it.

Everything is real: TLS with certificates that `phalanx.pki` issues, the coordinator's and the
trainers' servers on ephemeral loopback ports, and attackers that are plain gRPC clients holding
no certificate, an outsider's, an expired one, or an honest site's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from coordinator.run import RoundFailed
from coordinator.registry import RegistryLimits
from phalanx.codec import encode, layout_of, manifest_of
from phalanx.pki import site_san
from phalanx.rpc import TlsCredentials
from phalanx.streams import discard_rest, read_adapter
from phalanx.v1 import coordinator_pb2, coordinator_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from tests.certs import Pki
from tests.harness import (
    LABELS,
    EchoSite,
    run_with_rogue,
    start_coordinator,
    start_echo_site,
    start_servicer_site,
    stop_sites,
)
from tests.test_bad_input import RogueTrainer, reply
from trainer.echo import synthetic_adapter
from trainer.node import RegistrationRefused

PARAMS = 1_000


def secure_channel(address: str, tls: TlsCredentials | None, server_name: str = "") -> grpc.aio.Channel:
    """A raw client channel: TLS with `tls` (client certificate and all), or plaintext when None."""
    if tls is None:
        return grpc.aio.insecure_channel(address)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert), options=options)


def register_request(name: str, address: str = "127.0.0.1:50999", **fields) -> coordinator_pb2.RegisterRequest:
    return coordinator_pb2.RegisterRequest(
        name=name,
        address=address,
        num_train_examples=fields.pop("num_train_examples", 100),
        num_test_examples=10,
        label_names=LABELS,
        adapter_layout=manifest_of(layout_of(synthetic_adapter(PARAMS))),
        **fields,
    )


async def register(address: str, tls: TlsCredentials | None, request: coordinator_pb2.RegisterRequest) -> grpc.StatusCode:
    """Register once as an attacker would; the call's status code."""
    async with secure_channel(address, tls) as channel:
        try:
            await coordinator_pb2_grpc.CoordinatorServiceStub(channel).Register(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            register.details = exc.details() or ""
            return exc.code()
    register.details = ""
    return grpc.StatusCode.OK


def train_requests(header: trainer_pb2.TrainHeader) -> list[trainer_pb2.TrainRequest]:
    encoded = encode(synthetic_adapter(PARAMS))
    header.adapter.CopyFrom(encoded.manifest)
    return [trainer_pb2.TrainRequest(header=header)] + [trainer_pb2.TrainRequest(chunk=c) for c in encoded.chunks]


def evaluate_requests(header: trainer_pb2.EvaluateHeader) -> list[trainer_pb2.EvaluateRequest]:
    encoded = encode(synthetic_adapter(PARAMS))
    header.adapter.CopyFrom(encoded.manifest)
    return [trainer_pb2.EvaluateRequest(header=header)] + [trainer_pb2.EvaluateRequest(chunk=c) for c in encoded.chunks]


def good_header(round_: int = 1, **fields) -> trainer_pb2.TrainHeader:
    values = {"run_id": "run-1", "round": round_, "local_steps": 1, "batch_size": 32, "learning_rate": 1e-3}
    return trainer_pb2.TrainHeader(**{**values, **fields})


async def train_call(channel: grpc.aio.Channel, header: trainer_pb2.TrainHeader) -> grpc.StatusCode:
    try:
        async for _ in trainer_pb2_grpc.TrainerServiceStub(channel).Train(iter(train_requests(header)), timeout=10):
            pass
    except grpc.aio.AioRpcError as exc:
        train_call.details = exc.details() or ""
        return exc.code()
    return grpc.StatusCode.OK


# A federation over mutual TLS -------------------------------------------------------------


async def test_a_federation_over_mutual_tls_knows_its_sites_by_their_certificates(tmp_path: Path, pki: Pki) -> None:
    coordinator = await start_coordinator(tmp_path, params=PARAMS, tls=pki.creds("coordinator"), rounds=2)
    sites = [await start_echo_site(coordinator.address, k, params=PARAMS, tls=pki.creds(f"echo-{k}")) for k in range(2)]
    try:
        rows = await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        await coordinator.close()
    assert [(r["round"], r["status"], r["trainers_accepted"]) for r in rows] == [(0, "ok", 0), (1, "ok", 2), (2, "ok", 2)]
    assert [e.name for e in coordinator.app.registry.all()] == ["echo-0", "echo-1"]


# Outsiders cannot connect at all ------------------------------------------------------------

OUTSIDERS = {
    "no certificate": lambda pki: None,
    "certificate from another CA": lambda pki: pki.from_another_ca("site-a"),
    "expired certificate": lambda pki: pki.expired("site-a"),
}


@pytest.mark.parametrize("outsider", list(OUTSIDERS))
async def test_outsiders_reach_neither_the_coordinator_nor_a_trainer(tmp_path: Path, pki: Pki, outsider: str) -> None:
    credentials = OUTSIDERS[outsider](pki)
    coordinator = await start_coordinator(tmp_path, params=PARAMS, tls=pki.creds("coordinator"), rounds=1)
    sites = [await start_echo_site(coordinator.address, k, params=PARAMS, tls=pki.creds(f"echo-{k}")) for k in range(2)]
    try:
        assert await register(coordinator.address, credentials, register_request("site-a")) == grpc.StatusCode.UNAVAILABLE
        async with secure_channel(sites[0].node.address, credentials, site_san("echo-0")) as channel:
            assert await train_call(channel, good_header()) == grpc.StatusCode.UNAVAILABLE
        rows = await coordinator.app.execute()  # and the run goes on
    finally:
        await stop_sites(sites)
        await coordinator.close()
    assert "site-a" not in [e.name for e in coordinator.app.registry.all()]
    assert rows[-1]["status"] == "ok" and rows[-1]["trainers_accepted"] == 2


# A site is who its certificate says ---------------------------------------------------------


async def test_a_site_cannot_register_under_another_sites_name(tmp_path: Path, pki: Pki) -> None:
    coordinator = await start_coordinator(tmp_path, params=PARAMS, tls=pki.creds("coordinator"))
    try:
        code = await register(coordinator.address, pki.creds("site-a"), register_request("site-b"))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "site-a" in register.details and "site-b" in register.details
        assert await register(coordinator.address, pki.creds("site-a"), register_request("")) == grpc.StatusCode.OK
    finally:
        await coordinator.close()
    assert [e.name for e in coordinator.app.registry.all()] == ["site-a"]


async def test_a_site_may_only_register_an_address_its_certificate_names(tmp_path: Path, pki: Pki) -> None:
    coordinator = await start_coordinator(tmp_path, params=PARAMS, tls=pki.creds("coordinator"))
    try:
        code = await register(coordinator.address, pki.creds("site-a"), register_request("site-a", "10.9.9.9:50000"))
    finally:
        await coordinator.close()
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not valid for host '10.9.9.9'" in register.details


# Only the coordinator drives a trainer --------------------------------------------------------


@pytest.fixture
async def site(pki: Pki) -> AsyncIterator[EchoSite]:
    """echo-0 over mTLS, a member of run "run-1" (last round 10), serving without a coordinator."""
    site = await start_echo_site("127.0.0.1:1", 0, params=PARAMS, tls=pki.creds("echo-0"), register=False)
    yield site
    await stop_sites([site])


def calling(site: EchoSite, credentials: TlsCredentials) -> grpc.aio.Channel:
    """A channel to echo-0 that presents `credentials` and checks the server is echo-0."""
    return secure_channel(site.node.address, credentials, site_san("echo-0"))


async def test_only_the_coordinator_may_call_a_trainer(pki: Pki, site: EchoSite) -> None:
    async with calling(site, pki.creds("site-b")) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        assert await train_call(channel, good_header()) == grpc.StatusCode.PERMISSION_DENIED
        assert "only the coordinator" in train_call.details and "site-b" in train_call.details
        evaluate = evaluate_requests(trainer_pb2.EvaluateHeader(run_id="run-1", round=1))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Evaluate(iter(evaluate), timeout=10)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.EndRun(trainer_pb2.EndRunRequest(run_id="run-1"), timeout=10)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not site.task.done()  # still serving
    async with calling(site, pki.creds("coordinator")) as channel:
        assert await train_call(channel, good_header()) == grpc.StatusCode.OK


async def test_the_coordinator_dials_only_the_site_that_holds_the_registered_name(pki: Pki) -> None:
    """A site's server certificate must be its own: site-b's server cannot answer calls meant for echo-0."""
    impostor = await start_echo_site("127.0.0.1:1", 1, params=PARAMS, tls=pki.creds("site-b"), register=False)
    try:
        async with secure_channel(impostor.node.address, pki.creds("coordinator"), site_san("echo-0")) as channel:
            assert await train_call(channel, good_header()) == grpc.StatusCode.UNAVAILABLE
    finally:
        await stop_sites([impostor])


async def test_end_run_must_name_the_run_the_trainer_is_in(pki: Pki, site: EchoSite) -> None:
    async with calling(site, pki.creds("coordinator")) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.EndRun(trainer_pb2.EndRunRequest(run_id="some-other-run"), timeout=10)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "this trainer is in run run-1" in error.value.details()
        assert not site.task.done()
        await stub.EndRun(trainer_pb2.EndRunRequest(run_id="run-1", reason="done"), timeout=10)
    assert await asyncio.wait_for(site.task, 5) == "done"


WORK_CASES = {
    "a million local steps": (good_header(local_steps=10**6), grpc.StatusCode.INVALID_ARGUMENT, "--max-local-steps"),
    "a huge batch": (good_header(batch_size=4096), grpc.StatusCode.INVALID_ARGUMENT, "--max-batch-size"),
    "no learning rate": (good_header(learning_rate=0.0), grpc.StatusCode.INVALID_ARGUMENT, "learning rate"),
    "a huge proximal mu": (good_header(proximal_mu=1e9), grpc.StatusCode.INVALID_ARGUMENT, "proximal mu 1000000000.0 is outside"),
    "a NaN proximal mu": (good_header(proximal_mu=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "proximal mu nan"),
    "round 2^32-1": (good_header(2**32 - 1), grpc.StatusCode.OUT_OF_RANGE, "past the last round (10)"),
    "another run": (good_header(run_id="run-0"), grpc.StatusCode.FAILED_PRECONDITION, "this trainer is in run run-1"),
}


async def test_a_trainer_bounds_the_work_a_request_may_ask_for(pki: Pki, site: EchoSite) -> None:
    async with calling(site, pki.creds("coordinator")) as channel:
        for case, (header, code, message) in WORK_CASES.items():
            assert await train_call(channel, header) == code, case
            assert message in train_call.details, (case, train_call.details)
        # None of them moved the trainer's round: the next plausible round is still served.
        assert await train_call(channel, good_header(1)) == grpc.StatusCode.OK
        assert await train_call(channel, good_header(2, local_steps=1_000, batch_size=256)) == grpc.StatusCode.OK


# Weights and aggregates ---------------------------------------------------------------------


def sending(adapter: dict[str, np.ndarray], num_examples: int = 100) -> RogueTrainer:
    """A site that replies with `adapter`, claiming `num_examples`, whatever it was sent."""
    return RogueTrainer(lambda header, _: reply(header, adapter, num_examples=num_examples))


async def test_a_reply_cannot_claim_more_examples_than_its_site_registered(tmp_path: Path) -> None:
    coordinator = await start_coordinator(tmp_path, params=PARAMS, start_with=3)
    target = {k: np.full_like(v, 7.0) for k, v in coordinator.initial.items()}
    rows = await run_with_rogue(coordinator, sending(target, num_examples=10**12), params=PARAMS)
    [failure] = rows[-1]["failures"]
    assert (failure["trainer"], failure["status"], failure["code"]) == ("rogue", "rejected", "INVALID_ARGUMENT")
    assert "claims 1000000000000 training examples; site rogue registered 100" in failure["reason"]
    for key, value in coordinator.initial.items():
        np.testing.assert_allclose(coordinator.app.run.adapter[key], value, rtol=1e-6)


async def test_the_allowlist_caps_a_sites_weight(tmp_path: Path) -> None:
    allow = tmp_path / "allow.txt"
    allow.write_text("echo-0\necho-1\nrogue 1   # may count as one example at most\n")
    coordinator = await start_coordinator(tmp_path, params=PARAMS, start_with=3, allow_sites=allow)
    target = {k: v + 201.0 for k, v in coordinator.initial.items()}
    rows = await run_with_rogue(coordinator, sending(target), params=PARAMS)
    assert rows[-1]["trainers_accepted"] == 3
    for key, value in coordinator.initial.items():  # weights 100, 100 and 1: the rogue moves it by 201 / 201
        np.testing.assert_allclose(coordinator.app.run.adapter[key], value + 1.0, rtol=1e-4)


async def test_an_aggregate_that_is_not_finite_is_refused_and_the_previous_adapter_stays(tmp_path: Path) -> None:
    coordinator = await start_coordinator(tmp_path, params=PARAMS, start_with=2)
    huge = {k: np.full_like(v, 3e38) for k, v in coordinator.initial.items()}
    rogues = [
        await start_servicer_site(coordinator.address, f"big-{k}", sending(huge), coordinator.initial, partition=k) for k in range(2)
    ]
    try:
        with pytest.raises(RoundFailed, match="the aggregate is not finite"):
            await coordinator.app.execute()
    finally:
        for rogue in rogues:
            await rogue.stop(0)
        await coordinator.close()
    assert coordinator.rows[-1]["round"] == 1 and coordinator.rows[-1]["status"] == "failed"
    for key, value in coordinator.initial.items():
        np.testing.assert_array_equal(coordinator.app.run.adapter[key], value)
    assert coordinator.app.run.outputs.load_latest_checkpoint() is None


class Stalling(RogueTrainer):
    """Announces its reply, then never sends the adapter: it would keep a transfer slot for ever."""

    def __init__(self) -> None:
        super().__init__(reply)

    async def Train(self, request_iterator, context) -> AsyncIterator[trainer_pb2.TrainResponse]:
        header, received, _ = await read_adapter(request_iterator, "header", expected=None, until_complete=True)
        yield reply(header, received)[0]
        await asyncio.sleep(3600)


async def test_trainers_that_stall_their_reply_lose_their_transfer_slot_not_the_round(tmp_path: Path) -> None:
    coordinator = await start_coordinator(
        tmp_path, params=PARAMS, start_with=5, max_transfers=1, transfer_timeout=0.5, round_timeout=60
    )
    stalling = [
        await start_servicer_site(coordinator.address, f"stall-{k}", Stalling(), coordinator.initial, partition=k)
        for k in range(3)
    ]
    sites = [await start_echo_site(coordinator.address, k, params=PARAMS) for k in range(2)]
    try:
        rows = await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        for server in stalling:
            await server.stop(0)
        await coordinator.close()
    row = rows[-1]
    assert row["status"] == "ok" and row["trainers_accepted"] == 2
    failures = [f for f in row["failures"] if f["phase"] == "train"]
    assert sorted(f["trainer"] for f in failures) == ["stall-0", "stall-1", "stall-2"]
    assert all(f["code"] == "DEADLINE_EXCEEDED" and "did not arrive within" in f["reason"] for f in failures)


# The registry is bounded ----------------------------------------------------------------------


async def test_the_registry_is_bounded_rate_limited_and_evicts_the_silent(tmp_path: Path) -> None:
    limits = RegistryLimits(max_trainers=3, registrations_per_minute=2, evict_after=1.0)
    coordinator = await start_coordinator(tmp_path, params=PARAMS, registry=limits)
    address = coordinator.address
    try:
        for k in range(3):
            assert await register(address, None, register_request(f"fake-{k}", f"127.0.0.1:{60000 + k}")) == grpc.StatusCode.OK
        assert await register(address, None, register_request("fake-3", "127.0.0.1:60003")) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the registry is full (3 trainers" in register.details
        assert await register(address, None, register_request("fake-0", "127.0.0.1:60000")) == grpc.StatusCode.OK
        assert await register(address, None, register_request("fake-0", "127.0.0.1:60000")) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "registered 2 times in the last 60 s" in register.details
        await asyncio.sleep(1.5)  # none of them keeps a heartbeat
        assert await register(address, None, register_request("fake-3", "127.0.0.1:60003")) == grpc.StatusCode.OK
        assert [e.name for e in coordinator.app.registry.all()] == ["fake-3"]
    finally:
        await coordinator.close()


BAD_NAMES = ["", "x" * 65, "a\nb: forged log line", "\x1b[31mred", "a/b", "n" * 3_900_000]
BAD_ADDRESSES = {
    "unix:/tmp/socket": grpc.StatusCode.INVALID_ARGUMENT,
    "dns:///example.org:443": grpc.StatusCode.INVALID_ARGUMENT,
    "127.0.0.1": grpc.StatusCode.INVALID_ARGUMENT,
    "127.0.0.1:99999": grpc.StatusCode.INVALID_ARGUMENT,
    "127.0.0.1:22": grpc.StatusCode.INVALID_ARGUMENT,
    "exa mple:5000\n": grpc.StatusCode.INVALID_ARGUMENT,
    "10.1.2.3:50000": grpc.StatusCode.PERMISSION_DENIED,  # plaintext coordinator: loopback trainers only
}


async def test_bad_names_and_addresses_are_refused_without_echoing_them(tmp_path: Path) -> None:
    coordinator = await start_coordinator(tmp_path, params=PARAMS)
    try:
        for name in BAD_NAMES:
            assert await register(coordinator.address, None, register_request(name)) == grpc.StatusCode.INVALID_ARGUMENT
            assert len(register.details) < 300 and "\n" not in register.details and "\x1b" not in register.details
        for address, code in BAD_ADDRESSES.items():
            assert await register(coordinator.address, None, register_request("site-x", address)) == code, address
            assert len(register.details) < 300 and "\n" not in register.details
    finally:
        await coordinator.close()
    assert coordinator.app.registry.all() == []


class Forging(RogueTrainer):
    """Fails every Train with status details made to forge log lines, and very long."""

    def __init__(self) -> None:
        super().__init__(reply)

    async def Train(self, request_iterator, context) -> AsyncIterator[trainer_pb2.TrainResponse]:
        await discard_rest(request_iterator)
        await context.abort(grpc.StatusCode.INTERNAL, "oops\n00:00:00 coordinator INFO round 9 accepted\x1b[2K" + "x" * 5000)
        yield trainer_pb2.TrainResponse()  # never reached: makes this an async generator, as grpc wants


async def test_a_trainers_status_details_are_escaped_and_cut_in_logs_and_metrics(tmp_path: Path, caplog) -> None:
    coordinator = await start_coordinator(tmp_path, params=PARAMS, start_with=3)
    rows = await run_with_rogue(coordinator, Forging(), params=PARAMS)
    [failure] = rows[-1]["failures"]
    assert failure["trainer"] == "rogue" and failure["reason"].startswith("oops\\n00:00:00")
    assert len(failure["reason"]) < 600 and "\x1b" not in failure["reason"]
    assert not any("\n00:00:00" in record.getMessage() for record in caplog.records)


# The allowlist --------------------------------------------------------------------------------


async def test_a_refused_registration_is_logged_with_the_site_and_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="coordinator")
    coordinator = await start_coordinator(tmp_path, params=PARAMS, start_with=1, min_trainers=1)
    misfit = await start_echo_site(coordinator.address, 0, params=PARAMS // 2)
    try:
        with pytest.raises(RegistrationRefused, match="adapter layout differs"):
            await asyncio.wait_for(misfit.task, 10)
    finally:
        await stop_sites([misfit])
        await coordinator.close()
    assert any(
        "refused the registration of site echo-0: adapter layout differs" in r.getMessage() for r in caplog.records
    ), caplog.text


async def test_the_allowlist_admits_only_its_sites_and_a_removed_site_is_no_longer_sampled(tmp_path: Path) -> None:
    allow = tmp_path / "allow.txt"
    allow.write_text("echo-0\necho-1\n")

    def after(row: dict) -> None:
        if row["round"] == 1:
            allow.write_text("echo-0\n")

    coordinator = await start_coordinator(tmp_path, params=PARAMS, rounds=3, min_trainers=1, allow_sites=allow, on_round=after)
    sites = [await start_echo_site(coordinator.address, k, params=PARAMS) for k in range(2)]
    outsider = await start_echo_site(coordinator.address, 2, params=PARAMS)
    try:
        with pytest.raises(RegistrationRefused, match="PERMISSION_DENIED: .site echo-2 is not in the coordinator's --allow-sites"):
            await asyncio.wait_for(outsider.task, 10)
        rows = await coordinator.app.execute()
    finally:
        await stop_sites([*sites, outsider])
        await coordinator.close()
    assert [r["trainers_sampled"] for r in rows] == [0, 2, 1, 1]
