"""Learning strategies through a real coordinator and trainer servicers: FedProx, FFA-LoRA, the naive
averaging error, mixed LoRA ranks with a PEFT adapter out, and resource-aware selection."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator.lora_math import naive_averaging_error
from phalanx.model import ModelConfig, adapter_state, build_model, ffa_lora_a, save_adapter
from tests.harness import start_coordinator, start_echo_site, stop_sites
from trainer.echo import EchoLearner
from trainer.jobs import TrainOutcome
from trainer.learner import Learner, proximal_term

MODULE = "base_model.model.bert.encoder.layer.0.attention.self.query"
LORA_LIKE = {
    f"{MODULE}.lora_A.weight": np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32),
    f"{MODULE}.lora_B.weight": np.zeros((16, 4), dtype=np.float32),
    "base_model.model.classifier.modules_to_save.default.weight": np.zeros((3, 16), dtype=np.float32),
}


class RecordingEcho(EchoLearner):
    """Echoes the adapter plus its `shift`, and keeps what it was given and what it sent."""

    def __init__(self, layout: Mapping[str, np.ndarray], shift: float) -> None:
        super().__init__(layout, shift=shift)
        self.received: list[dict[str, np.ndarray]] = []
        self.sent: list[dict[str, np.ndarray]] = []
        self.proximal_mu: list[float] = []

    def train(self, adapter: Mapping[str, np.ndarray], **kwargs) -> TrainOutcome:
        self.received.append(dict(adapter))
        self.proximal_mu.append(kwargs["proximal_mu"])
        outcome = super().train(adapter, **kwargs)
        self.sent.append(dict(outcome.adapter))
        return outcome


def test_the_proximal_term_adds_mu_times_the_distance_to_the_gradient() -> None:
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    anchor = torch.tensor([0.0, 1.0, 0.5])
    ((w**2).sum() + proximal_term([w], [anchor], 0.3)).backward()
    assert torch.allclose(w.grad, 2 * w.detach() + 0.3 * (w.detach() - anchor))
    assert float(proximal_term([w.detach()], [anchor], 0.3)) == pytest.approx(0.15 * (1 + 9 + 0))


def test_fedprox_keeps_local_training_near_the_global_adapter(tiny_model_dir: Path) -> None:
    from tests.test_compute import _site

    learner = Learner(ModelConfig(model=str(tiny_model_dir), max_length=16), _site(60))
    start = learner.layout_adapter
    common = {"steps": 6, "batch_size": 8, "learning_rate": 5e-2, "seed": 3, "stop": threading.Event()}

    def drift(mu: float) -> float:
        out = learner.train(start, proximal_mu=mu, **common).adapter
        return float(np.sqrt(sum(((out[k] - start[k]) ** 2).sum() for k in start)))

    assert drift(50.0) < 0.8 * drift(0.0)


async def test_ffa_lora_never_sends_lora_a_and_averages_exactly(tmp_path: Path) -> None:
    coordinator = await start_coordinator(
        tmp_path, initial=LORA_LIKE, rounds=2, lora_variant="ffa", deterministic=True, proximal_mu=0.25, seed=5
    )
    learners = [RecordingEcho(LORA_LIKE, shift) for shift in (0.1, 0.3)]
    sites = [await start_echo_site(coordinator.address, k, learner=learner) for k, learner in enumerate(learners)]
    try:
        rows = await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        await coordinator.close()
    a_key = f"{MODULE}.lora_A.weight"
    frozen = ffa_lora_a(LORA_LIKE, 5)[a_key]
    assert not np.array_equal(frozen, LORA_LIKE[a_key])
    # The sites derive lora_A themselves: it is never on the wire, and what travels is B and the head.
    assert all(np.array_equal(got[a_key], frozen) for learner in learners for got in learner.received)
    federated = sum(a.nbytes for k, a in LORA_LIKE.items() if k != a_key)
    assert all(r["adapter_bytes"] == federated for r in rows)
    assert all(mu == 0.25 for learner in learners for mu in learner.proximal_mu)  # FedProx's mu travels too
    final = coordinator.app.run.adapter
    assert np.array_equal(final[a_key], frozen)
    # Exact: the product of the averaged factors is the average of the sites' products (their lora_A
    # is the frozen one: what a site does to it never leaves the site).
    b_key = f"{MODULE}.lora_B.weight"
    mean_of_products = np.mean([learner.sent[-1][b_key] @ frozen for learner in learners], axis=0)
    np.testing.assert_allclose(final[b_key] @ final[a_key], mean_of_products, rtol=1e-5, atol=1e-6)
    assert [r.get("lora_naive_error") for r in rows] == [None, 0.0, 0.0]


async def test_the_naive_factor_averaging_error_is_reported_each_round(tmp_path: Path) -> None:
    coordinator = await start_coordinator(tmp_path, initial=LORA_LIKE, rounds=2, deterministic=True)
    learners = [RecordingEcho(LORA_LIKE, shift) for shift in (0.1, 0.3)]
    sites = [await start_echo_site(coordinator.address, k, learner=learner) for k, learner in enumerate(learners)]
    try:
        rows = await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        await coordinator.close()
    for round_ in (1, 2):
        replies = [learner.sent[round_ - 1] for learner in learners]
        expected = naive_averaging_error(replies, [100, 100])
        assert expected > 0.01
        assert rows[round_]["lora_naive_error"] == pytest.approx(expected, abs=1e-6)
        span = next(
            s for s in coordinator.spans.get_finished_spans() if s.name == "fl.round" and s.attributes["fl.round"] == round_
        )
        assert span.attributes["fl.lora.naive_error"] == pytest.approx(expected, rel=1e-6)


async def test_mixed_ranks_give_a_peft_adapter_with_the_averaged_product(tmp_path: Path, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run_model = ModelConfig(model=str(tiny_model_dir), lora_r=8, max_length=16)
    layouts = {r: adapter_state(build_model(ModelConfig(model=str(tiny_model_dir), lora_r=r, max_length=16))) for r in (2, 4)}
    coordinator = await start_coordinator(
        tmp_path, initial=adapter_state(build_model(run_model)), model=run_model, rounds=2, mixed_ranks=True
    )
    learners = {2: RecordingEcho(layouts[2], 0.05), 4: RecordingEcho(layouts[4], -0.02)}
    sites = [await start_echo_site(coordinator.address, k, learner=learners[r]) for k, r in enumerate((2, 4))]
    try:
        rows = await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        await coordinator.close()
    assert [r["trainers_accepted"] for r in rows[1:]] == [2, 2]
    for rank, learner in learners.items():  # each site got, and sent, factors of its own rank
        assert all(got[f"{MODULE}.lora_A.weight"].shape == (rank, 32) for got in learner.received)
    a_key, b_key = f"{MODULE}.lora_A.weight", f"{MODULE}.lora_B.weight"
    # α = 16 at both ranks: scale α/r; equal example counts weigh the sites alike.
    expected = np.mean([(16 / r) * (ln.sent[-1][b_key] @ ln.sent[-1][a_key]) for r, ln in learners.items()], axis=0)
    assert np.abs(expected).max() > 1e-3

    save_adapter(
        build_model(run_model), coordinator.app.run.adapter, tmp_path / "adapter",
        model_name=run_model.model, label_names=("negative", "neutral", "positive"),
    )  # fmt: skip
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=3)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    query = peft.base_model.model.bert.encoder.layer[0].attention.self.query
    product = query.scaling["default"] * (query.lora_B["default"].weight @ query.lora_A["default"].weight)
    np.testing.assert_allclose(product.detach().numpy(), expected, atol=1e-5)
    heads = [k for k in coordinator.app.run.adapter if "lora_" not in k]
    assert heads  # the classification head, averaged as usual
    for head in heads:
        np.testing.assert_allclose(
            coordinator.app.run.adapter[head], np.mean([ln.sent[-1][head] for ln in learners.values()], axis=0), rtol=1e-6
        )


async def test_resource_selection_skips_a_site_below_the_threshold_and_says_so(tmp_path: Path) -> None:
    from coordinator.selection import SelectionConfig

    coordinator = await start_coordinator(
        tmp_path, rounds=2, min_trainers=2, start_with=3, selection=SelectionConfig("resource", min_cores=2)
    )
    sites = [await start_echo_site(coordinator.address, k, cores=cores) for k, cores in enumerate((4, 1, 2))]
    try:
        rows = await coordinator.app.execute()
    finally:
        await stop_sites(sites)
        await coordinator.close()
    for row in rows[1:]:
        assert row["selection"]["policy"] == "resource"
        assert row["selection"]["chosen"] == ["echo-0", "echo-2"]
        assert row["selection"]["skipped"] == [{"site": "echo-1", "reason": "1 cores < --selection-min-cores 2"}]
        assert row["trainers_sampled"] == 2
