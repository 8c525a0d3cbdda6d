"""Secure aggregation through the real services: mutual TLS, the coordinator's stages, echo and real sites.

The protocol's arithmetic is tested in memory in test_secagg.py; here every message crosses
gRPC, every key is signed with a certificate `phalanx.pki` issued, and the sums come out of
`Federation`. Echo sites add a known shift to what they receive, so the aggregate is known.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import load_file

from coordinator.run import RoundFailed
from phalanx.secagg.masks import error_bound, levels
from phalanx.v1 import trainer_pb2, trainer_pb2_grpc
from tests.certs import Pki
from tests.harness import EchoSite, start_coordinator, start_echo_site, stop_sites
from tests.test_trust import secure_channel
from trainer.secure import MaskedUpdate

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
PARAMS = 1_000
SHIFTS = (0.01, -0.02, 0.03, 0.005, -0.04)
EXAMPLES = (100, 300, 200, 50, 400)


async def federation(
    tmp_path: Path, pki: Pki, sites: int = 5, *, delays: dict[int, float] | None = None, **settings
):
    """A coordinator with secure aggregation and `sites` echo sites over mTLS: echo-k adds SHIFTS[k] and holds EXAMPLES[k]."""
    settings.setdefault("min_trainers", 3)
    coordinator = await start_coordinator(
        tmp_path,
        params=PARAMS,
        tls=pki.creds("coordinator"),
        start_with=sites,
        secure_aggregation=True,
        **settings,
    )
    echoes = [
        await start_echo_site(
            coordinator.address,
            k,
            params=PARAMS,
            tls=pki.creds(f"echo-{k}"),
            shift=SHIFTS[k],
            num_train=EXAMPLES[k],
            delay=(delays or {}).get(k, 0.0),
        )  # fmt: skip
        for k in range(sites)
    ]
    return coordinator, echoes


def moved(coordinator) -> np.ndarray:
    """How far the global adapter moved from the initial one, every coordinate."""
    return np.concatenate(
        [(coordinator.app.run.adapter[k] - v).ravel() for k, v in coordinator.initial.items()]
    )


def weighted_shift(sites: list[int]) -> float:
    return sum(SHIFTS[k] * EXAMPLES[k] for k in sites) / sum(EXAMPLES[k] for k in sites)


async def test_a_secure_round_is_the_weighted_fedavg_of_the_replies_and_traces_every_stage(
    tmp_path: Path, pki: Pki
) -> None:
    coordinator, sites = await federation(tmp_path, pki, rounds=2)
    try:
        rows = await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        await coordinator.close()
    assert [(r["round"], r["status"], r["trainers_accepted"]) for r in rows] == [
        (0, "ok", 0),
        (1, "ok", 5),
        (2, "ok", 5),
    ]
    # Quantisation is off by at most half a level per site; the float32 adapter adds its own rounding.
    bound = 2 * error_bound(5, 1.0, 5) + 1e-6
    np.testing.assert_allclose(moved(coordinator), 2 * weighted_shift(list(range(5))), atol=bound)
    spans = coordinator.spans.get_finished_spans()
    rounds = {s.context.span_id: s for s in spans if s.name == "fl.round"}
    stages = [s for s in spans if s.name.startswith("fl.secagg.")]
    assert sorted({s.name for s in stages}) == [
        "fl.secagg.keys",
        "fl.secagg.masked_input",
        "fl.secagg.shares",
        "fl.secagg.unmask",
    ]
    assert len(stages) == 8 and all(s.parent.span_id in rounds for s in stages)
    unmask = next(s for s in stages if s.name == "fl.secagg.unmask")
    assert unmask.attributes["fl.secagg.survivors"] == 5 and unmask.attributes["fl.secagg.dropped"] == 0
    keys = next(s for s in stages if s.name == "fl.secagg.keys")
    assert (keys.attributes["fl.secagg.neighbours"], keys.attributes["fl.secagg.threshold"]) == (4, 3)
    # Each site's reply is its masked words: 4 bytes per parameter, as float32 would be.
    assert rows[1]["bytes_received"] > 5 * 4 * PARAMS


async def test_a_site_that_drops_after_sharing_its_keys_is_unmasked_with_its_neighbours_shares(
    tmp_path: Path, pki: Pki
) -> None:
    coordinator, sites = await federation(tmp_path, pki, delays={2: 5.0}, round_timeout=2.0)
    try:
        rows = await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        await coordinator.close()
    failure = rows[1]["failures"][0]
    assert (failure["trainer"], failure["code"]) == ("echo-2", "DEADLINE_EXCEEDED")
    assert failure["reason"].startswith("masked input:")
    survivors = [0, 1, 3, 4]
    np.testing.assert_allclose(
        moved(coordinator), weighted_shift(survivors), atol=error_bound(5, 1.0, 5) * 5 + 1e-6
    )


async def test_a_wrong_length_masked_reply_is_rejected_and_the_sum_of_the_others_goes_on(
    tmp_path: Path, pki: Pki
) -> None:
    coordinator, sites = await federation(tmp_path, pki)
    rounds = sites[4].node.servicer._secure_rounds
    honest = rounds.mask
    rounds.mask = lambda *args: MaskedUpdate(honest(*args).words[:-1], 0)  # one word short
    try:
        rows = await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        await coordinator.close()
    failure = rows[1]["failures"][0]
    assert (failure["trainer"], failure["status"], failure["code"]) == (
        "echo-4",
        "rejected",
        "INVALID_ARGUMENT",
    )
    assert f"expected [{PARAMS}]" in failure["reason"]
    np.testing.assert_allclose(
        moved(coordinator), weighted_shift([0, 1, 2, 3]), atol=error_bound(5, 1.0, 5) * 5 + 1e-6
    )


async def test_more_dropouts_than_the_threshold_allows_fail_the_round_and_release_nothing(
    tmp_path: Path, pki: Pki
) -> None:
    # Three sites: k = 2, t = 2. With one gone, each survivor's self-mask seed has one share left.
    coordinator, sites = await federation(
        tmp_path, pki, sites=3, delays={1: 5.0}, round_timeout=2.0, min_trainers=2
    )
    try:
        with pytest.raises(
            RoundFailed,
            match=r"cannot remove the mask of site echo-[02]: 1 shares of its self-mask seed arrived, 2 needed",
        ):
            await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        await coordinator.close()
    assert coordinator.rows[-1]["status"] == "failed"
    assert not moved(coordinator).any()


async def test_secure_aggregation_with_dp_adds_the_noise_at_the_sites_and_reports_epsilon(
    tmp_path: Path, pki: Pki
) -> None:
    coordinator, sites = await federation(tmp_path, pki, clip_norm=1.0, dp_noise_multiplier=2.0, rounds=1)
    try:
        rows = await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        await coordinator.close()
    assert rows[-1]["dp_epsilon"] > 0
    # Weights are uniform (1/5); each of the 5 sites adds noise of zC/√3 (3 survivors are the fewest the round takes),
    # so the sum carries zC·√(5/3), divided by the 5 sampled.
    mean_shift = sum(SHIFTS) / 5
    noise = moved(coordinator) - mean_shift
    assert abs(noise.mean()) < 0.1
    assert noise.std() == pytest.approx(2.0 * math.sqrt(5 / 3) / 5, rel=0.08)


async def test_adaptive_clipping_under_secure_aggregation_counts_unclipped_updates_in_the_masked_sum(
    tmp_path: Path, pki: Pki
) -> None:
    # Update norms are |shift|·√P: 0.16 to 1.26. With C = 0.5, two of five updates are within it.
    coordinator, sites = await federation(
        tmp_path, pki, rounds=3, clip_norm=0.5, dp_noise_multiplier=0.3, dp_adaptive_clipping=True,
        dp_clipped_count_stddev=0.2,
    )  # fmt: skip
    try:
        rows = await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        await coordinator.close()
    first = rows[1]
    assert first["clip_norm"] == 0.5
    # The count's noise: σ_b/√3 from each of 5 sites, over 5 sampled: ≈ 0.052.
    assert first["unclipped_fraction"] == pytest.approx(2 / 5, abs=0.2)
    assert rows[2]["clip_norm"] == pytest.approx(
        0.5 * math.exp(-0.2 * (first["unclipped_fraction"] - 0.5)), rel=1e-4
    )


async def _raw_site(
    pki: Pki, tmp_path: Path
) -> tuple[EchoSite, trainer_pb2_grpc.TrainerServiceStub, grpc.aio.Channel]:
    site = await start_echo_site("127.0.0.1:1", 0, params=PARAMS, tls=pki.creds("echo-0"), register=False)
    channel = secure_channel(
        site.node.address, pki.creds("coordinator"), server_name="echo-0.site.phalanx.invalid"
    )
    return site, trainer_pb2_grpc.TrainerServiceStub(channel), channel


def advertise(
    round_: int, attempt: int = 0, participants=("echo-0", "echo-1", "echo-2")
) -> trainer_pb2.AdvertiseKeysRequest:
    return trainer_pb2.AdvertiseKeysRequest(
        round=trainer_pb2.SecureRound(run_id="run-1", round=round_, attempt=attempt),
        participants=list(participants), neighbours=2, threshold=2,
    )  # fmt: skip


async def test_a_site_refuses_replayed_and_out_of_turn_stages_with_a_named_status(
    tmp_path: Path, pki: Pki
) -> None:
    site, stub, channel = await _raw_site(pki, tmp_path)
    try:
        first = await stub.AdvertiseKeys(advertise(2))
        assert first.keys.site == "echo-0" and len(first.keys.mask_public_key) == 32
        for replay in (advertise(2), advertise(1)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.AdvertiseKeys(replay)
            assert (
                refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                and "is closed" in refused.value.details()
            )
        second = await stub.AdvertiseKeys(advertise(2, attempt=1))  # a retried round is keyed afresh
        assert second.keys.mask_public_key != first.keys.mask_public_key
        unmask = trainer_pb2.UnmaskRequest(
            round=trainer_pb2.SecureRound(run_id="run-1", round=2, attempt=1), survivors=["echo-1", "echo-2"]
        )
        with pytest.raises(grpc.aio.AioRpcError) as early:
            await stub.Unmask(unmask)  # before it has shared or masked anything
        assert (
            early.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            and "cannot take the unmask step" in early.value.details()
        )
        with pytest.raises(grpc.aio.AioRpcError) as outsider:
            await stub.AdvertiseKeys(advertise(3, participants=("echo-1", "echo-2", "echo-3")))
        assert (
            outsider.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            and "not among the round's participants" in outsider.value.details()
        )
        with pytest.raises(grpc.aio.AioRpcError) as past:
            await stub.AdvertiseKeys(advertise(11))
        assert past.value.code() == grpc.StatusCode.OUT_OF_RANGE
    finally:
        await channel.close()
        await stop_sites([site])


async def test_a_site_refuses_keys_not_signed_by_their_sites_certificate(tmp_path: Path, pki: Pki) -> None:
    site, stub, channel = await _raw_site(pki, tmp_path)
    peers = [
        await start_echo_site("127.0.0.1:1", k, params=PARAMS, tls=pki.creds(f"echo-{k}"), register=False)
        for k in (1, 2)
    ]
    try:
        await stub.AdvertiseKeys(advertise(1))
        neighbour_keys = [p.node.servicer._secure_rounds.advertise(advertise(1)).keys for p in peers]
        forged = trainer_pb2.SignedKeys()
        forged.CopyFrom(neighbour_keys[0])
        forged.mask_public_key = bytes(32 - 1) + b"\x07"  # the coordinator's own key in place of echo-1's
        share = trainer_pb2.ShareKeysRequest(round=advertise(1).round, neighbours=[forged, neighbour_keys[1]])
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ShareKeys(share)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "keys of site echo-1: bad signature" in refused.value.details()
        honest = await stub.ShareKeys(
            trainer_pb2.ShareKeysRequest(round=advertise(1).round, neighbours=neighbour_keys)
        )
        assert sorted(s.site for s in honest.shares) == ["echo-1", "echo-2"]
    finally:
        await channel.close()
        await stop_sites([site, *peers])


async def test_only_the_coordinator_may_drive_the_stages(tmp_path: Path, pki: Pki) -> None:
    site = await start_echo_site("127.0.0.1:1", 0, params=PARAMS, tls=pki.creds("echo-0"), register=False)
    channel = secure_channel(
        site.node.address, pki.creds("echo-1"), server_name="echo-0.site.phalanx.invalid"
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await trainer_pb2_grpc.TrainerServiceStub(channel).AdvertiseKeys(advertise(1))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await channel.close()
        await stop_sites([site])


async def test_a_site_without_certificates_refuses_secure_aggregation(tmp_path: Path) -> None:
    site = await start_echo_site("127.0.0.1:1", 0, params=PARAMS, register=False)
    channel = grpc.aio.insecure_channel(site.node.address)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await trainer_pb2_grpc.TrainerServiceStub(channel).AdvertiseKeys(advertise(1))
        assert (
            refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            and "needs this site's certificate" in refused.value.details()
        )
    finally:
        await channel.close()
        await stop_sites([site])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--secure-aggregation", "--aggregator", "median"], "--aggregator median needs each site's update"),
        (["--secure-aggregation", "--aggregator", "trimmed-mean"], "secure aggregation gives only their sum"),
        (
            ["--secure-aggregation", "--spawn-trainers", "3", "--insecure"],
            "secure aggregation needs certificates",
        ),
        (["--secure-aggregation"], "secure aggregation needs certificates"),
    ],
)
def test_secure_runs_that_cannot_work_are_refused_with_a_message(
    flags: list[str], message: str, capsys
) -> None:
    from coordinator.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(flags)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def run_coordinator(out: Path, common_flags: list[str], *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable, "-m", "coordinator", "--spawn-trainers", "3", "--listen", "127.0.0.1:0", "--out", str(out),
            "--rounds", "2", "--local-steps", "3", "--batch-size", "8", "--eval-max-examples", "20", "--deterministic",
            *flags, *common_flags,
        ],  # fmt: skip
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_federation_of_processes_learns_the_same_adapter_securely_as_in_the_clear(
    tmp_path: Path, common_flags: list[str]
) -> None:
    """Real trainers (the tiny BERT) train the same way in both runs; only the sum is computed differently."""
    plain = run_coordinator(tmp_path / "plain", common_flags)
    secure = run_coordinator(tmp_path / "secure", common_flags, "--secure-aggregation")
    for result in (plain, secure):
        assert result.returncode == 0, result.stdout + result.stderr
    assert "Secure aggregation (SecAgg+)" in secure.stdout
    rows = [json.loads(line) for line in (tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["status"], r["trainers_accepted"]) for r in rows] == [
        (0, "ok", 0),
        (1, "ok", 3),
        (2, "ok", 3),
    ]
    a = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "secure" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    # Per round: half a quantisation level per site (range 1), and float32 rounding of the sum.
    tolerance = 2 * (3 / (2 * levels(3))) + 1e-6
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=tolerance)


def test_a_private_secure_federation_of_processes_reports_epsilon(
    tmp_path: Path, common_flags: list[str]
) -> None:
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable, "-m", "coordinator", "--spawn-trainers", "3", "--listen", "127.0.0.1:0", "--out", str(out),
            "--rounds", "2", "--local-steps", "2", "--batch-size", "8", "--eval-max-examples", "20",
            "--secure-aggregation", "--clip-norm", "0.5", "--dp-noise-multiplier", "1.0", *common_flags,
        ],  # fmt: skip
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert 0 == rows[0]["dp_epsilon"] < rows[1]["dp_epsilon"] < rows[2]["dp_epsilon"]
