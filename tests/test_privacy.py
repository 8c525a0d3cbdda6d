"""Differential privacy: the noise, the accounting, the budget, and DP rounds of a real coordinator."""

from __future__ import annotations

import json
import math
import secrets
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from coordinator.aggregation import DpFedAvg
from coordinator.outputs import RunOutputs
from phalanx.privacy import AdaptiveClip, PrivacyLedger, gaussian_noise, round_event
from tests.harness import Coordinator, start_coordinator, start_echo_site, stop_sites
from tests.test_coordinator_faults import ENV, ROOT

PARAMS = 20_000


def test_noise_is_gaussian_with_the_asked_deviation_and_fresh_every_draw() -> None:
    draw = gaussian_noise(200_001, 3.0)
    assert draw.shape == (200_001,) and np.isfinite(draw).all()
    assert stats.kstest(draw / 3.0, "norm").pvalue > 1e-4
    assert abs(draw.std() / 3.0 - 1) < 0.01 and abs(draw.mean()) < 0.03
    assert not np.array_equal(gaussian_noise(10, 1.0), gaussian_noise(10, 1.0))


def test_epsilon_is_dp_accountings_for_the_sampling_the_coordinator_does() -> None:
    ledger = PrivacyLedger(1.0, 1e-5, [])
    for _ in range(50):
        ledger.record(100, 10)
    accountant = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.privacy_accountant.NeighboringRelation.REPLACE_ONE
    )
    accountant.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(0.5)), 50
        )
    )
    assert ledger.epsilon() == pytest.approx(accountant.get_epsilon(1e-5), rel=0.02)


def test_epsilon_of_every_site_every_round_is_bounded_by_the_gaussian_mechanisms_exact_value() -> None:
    """All sites sampled: T rounds of noise z on sensitivity 2 are one Gaussian with multiplier z / (2 sqrt T)."""
    z, rounds, delta = 4.0, 16, 1e-5
    ledger = PrivacyLedger(z, delta, [(5, 5, z)] * rounds)
    exact = dp_accounting.pld.PLDAccountant()
    exact.compose(dp_accounting.GaussianDpEvent(z / 2 / math.sqrt(rounds)))
    classic = min(rounds * a / (2 * (z / 2) ** 2) + math.log(1 / delta) / (a - 1) for a in np.linspace(1.01, 200, 20_000))
    assert exact.get_epsilon(delta) <= ledger.epsilon() <= classic
    assert ledger.epsilon() == pytest.approx(exact.get_epsilon(delta), rel=0.15)  # RDP is tight here


def test_calibration_spends_exactly_the_budget_and_resuming_keeps_each_rounds_noise() -> None:
    ledger = PrivacyLedger(0.0, 1e-5, [(10, 10, 8.0)])
    z = ledger.calibrate(3.0, [(10, 5)] * 20)
    planned = PrivacyLedger(z, 1e-5, [(10, 10, 8.0), *[(10, 5, z)] * 20])
    assert planned.epsilon() == pytest.approx(3.0, rel=1e-3)
    resumed = PrivacyLedger(9.0, 1e-5, [])
    resumed.resume(planned.to_metadata())
    assert resumed.rounds == planned.rounds and resumed.epsilon() == planned.epsilon()
    with pytest.raises(ValueError, match="already spend"):
        PrivacyLedger(0.0, 1e-5, [(10, 10, 0.5)]).calibrate(1.0, [(10, 5)])


def test_a_round_event_samples_without_replacement_unless_every_site_trains() -> None:
    assert isinstance(round_event(1.0, 10, 10), dp_accounting.GaussianDpEvent)
    event = round_event(1.0, 10, 3)
    assert isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent) and event.event.noise_multiplier == 0.5


def test_dp_fedavg_is_the_uniform_mean_over_the_sampled_count_plus_noise_of_the_asked_size() -> None:
    reference = {"a": np.zeros((100, 100), np.float32), "b": np.ones(500, np.float32)}
    updates = [{k: v + k_ + 1 for k, v in reference.items()} for k_ in range(3)]  # +1, +2, +3
    quiet = DpFedAvg(reference, sampled=4, noise_std=0.0)
    for u in updates:
        quiet.add(u, 1e9)  # weights are ignored
    assert np.allclose(quiet.result()["a"], 6 / 4) and np.allclose(quiet.result()["b"], 1 + 6 / 4)
    noisy = DpFedAvg(reference, sampled=4, noise_std=8.0)
    for u in updates:
        noisy.add(u, 1.0)
    deviation = noisy.result()["a"] - 6 / 4
    assert abs(deviation.std() - 8.0 / 4) < 0.05


async def run_private(tmp_path: Path, **settings) -> tuple[Coordinator, list[dict]]:
    """A coordinator with `settings` and two echo sites (they send the adapter back unchanged); its rows."""
    coordinator = await start_coordinator(tmp_path, params=PARAMS, clip_norm=0.5, **settings)
    sites = [await start_echo_site(coordinator.address, k, params=PARAMS) for k in range(2)]
    try:
        return coordinator, await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        await coordinator.close()


async def test_a_private_run_samples_its_trainers_with_secret_randomness(tmp_path: Path) -> None:
    public = await start_coordinator(tmp_path / "public", params=PARAMS, rounds=1, seed=7)
    private = await start_coordinator(tmp_path / "private", params=PARAMS, rounds=1, seed=7, clip_norm=1.0, dp_noise_multiplier=1.0)
    population = list(range(1000))
    try:
        assert public.app.run.training_rng(3).sample(population, 5) == public.app.run.training_rng(3).sample(population, 5)
        draws = {tuple(private.app.run.training_rng(3).sample(population, 5)) for _ in range(3)}
        assert isinstance(private.app.run.training_rng(3), secrets.SystemRandom) and len(draws) == 3
    finally:
        await public.close()
        await private.close()


async def test_private_rounds_add_noise_of_z_c_over_m_and_report_epsilon(tmp_path: Path) -> None:
    coordinator, rows = await run_private(tmp_path, rounds=2, dp_noise_multiplier=2.0, dp_delta=1e-5)
    # Echo sites send the adapter back unchanged: two rounds moved it by noise alone, N(0, (zC/m)^2) each.
    moved = np.concatenate([(coordinator.app.run.adapter[k] - v).ravel() for k, v in coordinator.initial.items()])
    assert moved.std() == pytest.approx(math.sqrt(2) * 2.0 * 0.5 / 2, rel=0.05)
    epsilons = [r["dp_epsilon"] for r in rows]
    assert epsilons[0] == 0 and 0 < epsilons[1] < epsilons[2]
    assert epsilons[2] == pytest.approx(PrivacyLedger(2.0, 1e-5, [(2, 2, 2.0)] * 2).epsilon())
    round_spans = [s for s in coordinator.spans.get_finished_spans() if s.name == "fl.round"]
    assert [s.attributes["fl.dp.epsilon"] for s in round_spans] == pytest.approx(epsilons)


async def test_the_run_stops_before_the_round_that_would_pass_the_budget(tmp_path: Path) -> None:
    budget = PrivacyLedger(3.0, 1e-5, [(2, 2, 3.0)] * 3).epsilon() * 1.01  # three rounds fit, a fourth does not
    coordinator, rows = await run_private(tmp_path, rounds=10, dp_noise_multiplier=3.0, dp_target_epsilon=budget)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["dp_epsilon"] <= budget
    assert "round 4 would bring ε to" in coordinator.app.run.stop_reason


async def test_a_budget_without_a_noise_multiplier_calibrates_one_that_spends_it(tmp_path: Path) -> None:
    coordinator, rows = await run_private(tmp_path, rounds=3, dp_target_epsilon=5.0)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["dp_epsilon"] == pytest.approx(5.0, rel=1e-3)
    assert coordinator.app.run.privacy.noise_multiplier > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dp-noise-multiplier", "1"], "differential privacy needs --clip-norm C"),
        (["--dp-target-epsilon", "3", "--clip-norm", "1", "--aggregator", "median"], "works with --aggregator fedavg only"),
        (["--dp-noise-multiplier", "1", "--clip-norm", "1", "--deterministic"], "cannot reproduce DP noise"),
        (["--dp-noise-multiplier", "1", "--clip-norm", "1", "--dp-delta", "1"], "--dp-delta must be in (0, 1)"),
        (
            ["--dp-noise-multiplier", "1", "--clip-norm", "1", "--dp-accountant", "pld", "--fraction-train", "0.5"],
            "--dp-accountant pld needs --fraction-train 1",
        ),
        (["--dp-adaptive-clipping", "--clip-norm", "1"], "--dp-adaptive-clipping needs differential privacy"),
    ],
)
def test_private_runs_that_cannot_work_are_refused_with_a_message(flags: list[str], message: str, capsys) -> None:
    from coordinator.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(flags)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_private_federation_of_processes_spends_its_budget_and_stops(tmp_path: Path, common_flags: list[str]) -> None:
    budget = PrivacyLedger(1.0, 1e-5, [(2, 2, 1.0)] * 2).epsilon() * 1.01  # two rounds fit, a third does not
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable, "-m", "coordinator", "--spawn-trainers", "2", "--listen", "127.0.0.1:0", "--out", str(out),
            "--rounds", "5", "--local-steps", "2", "--batch-size", "8", "--eval-max-examples", "20", "--clip-norm", "0.5",
            "--dp-noise-multiplier", "1.0", "--dp-target-epsilon", repr(budget), *common_flags,
        ],  # fmt: skip
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["status"] == "ok" for r in rows)
    assert 0 == rows[0]["dp_epsilon"] < rows[1]["dp_epsilon"] < rows[2]["dp_epsilon"] <= budget
    assert "stopped early: privacy budget: round 3 would bring ε to" in result.stdout
    assert f"ε = {rows[2]['dp_epsilon']:.4g} spent by the run" in result.stdout
    assert "Mutual TLS" in result.stdout  # and over mTLS, as every spawned federation


async def test_a_round_whose_sample_would_pass_the_budget_is_not_released(tmp_path: Path, monkeypatch) -> None:
    """The check before a round sees 4 live sites; by the time the round samples, 2 are left (q = 1, not 0.5)."""
    budget = PrivacyLedger(2.0, 1e-5, [(4, 2, 2.0)]).epsilon() * 1.01  # one round of 2 of 4 fits; 2 of 2 does not
    coordinator = await start_coordinator(
        tmp_path, params=PARAMS, rounds=3, clip_norm=0.5, dp_noise_multiplier=2.0, dp_target_epsilon=budget,
        start_with=4, min_trainers=2, fraction_train=0.5,
    )  # fmt: skip
    sites = [await start_echo_site(coordinator.address, k, params=PARAMS) for k in range(4)]
    registry = coordinator.app.registry
    live = registry.live
    calls_after_round_0 = []

    def shrinking() -> list:
        """Every site until round 0 is done and the check before round 1 has looked; two after that."""
        if coordinator.rows:
            calls_after_round_0.append(1)
        return live()[:2] if len(calls_after_round_0) > 1 else live()

    try:
        await registry.wait_for(4, 10)
        monkeypatch.setattr(registry, "live", shrinking)
        rows = await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        await coordinator.close()
    assert [(r["round"], r["status"]) for r in rows] == [(0, "ok")]
    assert coordinator.rows[-1]["round"] == 1 and coordinator.rows[-1]["status"] == "failed"
    assert "round 1 would bring ε to" in coordinator.app.run.stop_reason
    assert coordinator.app.run.privacy.rounds == []  # nothing released
    for key, value in coordinator.initial.items():
        np.testing.assert_array_equal(coordinator.app.run.adapter[key], value)


def test_adaptive_clipping_pays_for_the_count_with_update_noise_so_the_round_stays_at_z() -> None:
    clip = AdaptiveClip(1.0, count_std=2.0)
    z_update, count_std = clip.noise(1.5, sampled=10)
    # Update sum (sensitivity 2C, noise z_update·C) and count (sensitivity 1, noise σ_b) together are one
    # Gaussian mechanism; its multiplier is the z/2 that the ledger accounts.
    combined = 1 / math.sqrt((2 / z_update) ** 2 + (1 / count_std) ** 2)
    assert count_std == 2.0 and z_update > 1.5 and combined == pytest.approx(1.5 / 2)
    assert AdaptiveClip(1.0).noise(1.0, sampled=3) == pytest.approx((2 / math.sqrt(3), 1.0))  # σ_b = max(m/20, z)
    with pytest.raises(ValueError, match="must exceed half the noise multiplier"):
        AdaptiveClip(1.0, count_std=0.5).noise(1.0, sampled=10)


def test_adaptive_clipping_moves_the_clip_norm_geometrically_towards_the_quantile() -> None:
    clip = AdaptiveClip(1.0, quantile=0.5, learning_rate=0.2)
    clip.step(1.0)  # every update was within C: C shrinks
    assert clip.norm == pytest.approx(math.exp(-0.1))
    clip.step(0.0)  # none was: C grows back
    assert clip.norm == pytest.approx(1.0)
    fractions = [clip.noisy_fraction(3, 6, count_std=1.0) for _ in range(4000)]
    assert np.mean(fractions) == pytest.approx(0.5, abs=0.01) and np.std(fractions) == pytest.approx(1 / 6, rel=0.05)


async def test_adaptive_clipping_follows_the_update_norms_and_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    """Echo sites that add 0.01·(k+1) to every coordinate send updates of norm 0.01·(k+1)·√P: all above C = 0.05."""
    coordinator = await start_coordinator(
        tmp_path, params=PARAMS, rounds=4, clip_norm=0.05, dp_noise_multiplier=0.5, dp_adaptive_clipping=True,
        dp_clipped_count_stddev=0.5, start_with=4,
    )  # fmt: skip
    sites = [await start_echo_site(coordinator.address, k, params=PARAMS, shift=0.01 * (k + 1)) for k in range(4)]
    try:
        rows = await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        await coordinator.close()
    norms = [r["clip_norm"] for r in rows[1:]]
    assert norms[0] == 0.05 and all(b > a for a, b in zip(norms, norms[1:]))  # every update clipped: C grows
    assert all(abs(r["unclipped_fraction"]) < 0.6 for r in rows[1:])  # 0 of 4 within C, plus noise of 0.5/4
    checkpoint = RunOutputs(tmp_path).load_latest_checkpoint()
    assert float(checkpoint.metadata["dp_clip_norm"]) == coordinator.app.run.adaptive_clip.norm > norms[-1]
    resumed = AdaptiveClip(0.05)
    resumed.resume(checkpoint.metadata)
    assert resumed.norm == coordinator.app.run.adaptive_clip.norm
    assert rows[-1]["dp_epsilon"] == pytest.approx(PrivacyLedger(0.5, 1e-5, [(4, 4, 0.5)] * 4).epsilon())


def test_pld_accounting_is_dp_accountings_own_and_tighter_than_rdp() -> None:
    rounds = [(3, 3, 1.0)] * 8
    pld = PrivacyLedger(1.0, 1e-5, list(rounds), accountant="pld").epsilon()
    reference = dp_accounting.pld.PLDAccountant(
        neighboring_relation=dp_accounting.privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE
    )  # its own default discretisation
    reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(0.5), 8))
    assert pld == pytest.approx(reference.get_epsilon(1e-5), rel=1e-6)
    assert pld < PrivacyLedger(1.0, 1e-5, list(rounds)).epsilon()  # 39.4 against RDP's 41.6
    with pytest.raises(ValueError, match="sampling without replacement needs rdp"):
        PrivacyLedger(1.0, 1e-5, [(10, 3, 1.0)], accountant="pld").epsilon()


def test_pld_calibration_spends_exactly_the_budget_with_less_noise_than_rdp() -> None:
    pld, rdp = PrivacyLedger(0.0, 1e-5, [], accountant="pld"), PrivacyLedger(0.0, 1e-5, [])
    z_pld, z_rdp = pld.calibrate(20.0, [(3, 3)] * 8), rdp.calibrate(20.0, [(3, 3)] * 8)
    assert z_pld < z_rdp
    assert PrivacyLedger(z_pld, 1e-5, [(3, 3, z_pld)] * 8, accountant="pld").epsilon() == pytest.approx(20.0, rel=1e-3)


async def test_a_run_accounted_with_pld_reports_its_epsilon(tmp_path: Path) -> None:
    coordinator, rows = await run_private(tmp_path, rounds=2, dp_noise_multiplier=2.0, dp_accountant="pld")
    assert rows[-1]["dp_epsilon"] == pytest.approx(PrivacyLedger(2.0, 1e-5, [(2, 2, 2.0)] * 2, accountant="pld").epsilon())
    assert rows[-1]["dp_epsilon"] < PrivacyLedger(2.0, 1e-5, [(2, 2, 2.0)] * 2).epsilon()
