"""End to end in one process: a real coordinator and two real trainers on ephemeral loopback ports.

Every trainer span must have its round's `fl.round` span as an ancestor in the same trace,
which holds only if trace context travels in the gRPC metadata of each call.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from coordinator.app import CoordinatorApp
from coordinator.config import CoordinatorConfig, RoundConfig
from coordinator.outputs import RunOutputs
from phalanx.data import TextDataset
from phalanx.model import ModelConfig, adapter_state, build_model
from phalanx.partition import load_partition
from phalanx.telemetry import Telemetry
from trainer.learner import Learner
from trainer.node import NodeConfig, TrainerNode

ROUNDS = 2


def toy_dataset() -> TextDataset:
    words = {0: "awful terrible sad bad", 1: "table chair window door", 2: "great lovely happy good"}
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=120)
    texts = tuple(" ".join(rng.choice(words[int(y)].split(), size=5)) + f" {i}" for i, y in enumerate(labels))
    return TextDataset(texts=texts, labels=labels.astype(np.int64), label_names=("negative", "neutral", "positive"))


def ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[ReadableSpan]:
    chain = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        chain.append(span)
    return chain


@pytest.fixture
def model_config(tiny_model_dir: Path) -> ModelConfig:
    return ModelConfig(model=str(tiny_model_dir), num_labels=3, max_length=16)


@pytest.mark.parametrize("wire_dtype", ["float32", "bfloat16"])
async def test_round_span_is_ancestor_of_every_trainer_span(model_config: ModelConfig, tmp_path: Path, wire_dtype: str) -> None:
    dataset = toy_dataset()
    coordinator_spans, coordinator_metrics = InMemorySpanExporter(), InMemoryMetricReader()
    coordinator_telemetry = Telemetry.create(
        "phalanx-coordinator", span_exporter=coordinator_spans, metric_readers=[coordinator_metrics]
    )
    config = CoordinatorConfig(
        rounds=RoundConfig(
            rounds=ROUNDS, min_trainers=2, local_steps=3, batch_size=8, round_timeout=60, wire_dtype=wire_dtype
        ),
        model=model_config,
        label_names=dataset.label_names,
        listen="127.0.0.1:0",
        out=tmp_path,
        register_timeout=60,
    )
    initial = adapter_state(build_model(model_config))
    app = CoordinatorApp(config, coordinator_telemetry, RunOutputs(tmp_path), initial, run_id="run-1")
    address = await app.start()

    trainer_spans = [InMemorySpanExporter() for _ in range(2)]
    nodes = []
    for k in range(2):
        learner = Learner(model_config, load_partition(dataset, k, 2, seed=0, test_fraction=0.25))
        telemetry = Telemetry.create("phalanx-trainer", span_exporter=trainer_spans[k], metric_readers=[])
        node = TrainerNode(NodeConfig(partition=k, coordinator=address), learner, telemetry, dataset.label_names)
        await node.start()
        nodes.append((node, telemetry))
    serving = [asyncio.create_task(node.run()) for node, _ in nodes]
    try:
        rows = await asyncio.wait_for(app.execute(), timeout=120)
        metrics = coordinator_metrics.get_metrics_data()
    finally:
        await app.close("finished")
        reasons = await asyncio.wait_for(asyncio.gather(*serving), timeout=30)
        for node, telemetry in nodes:
            await node.close()
            telemetry.shutdown()
        coordinator_telemetry.shutdown()

    assert reasons == ["finished", "finished"]
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    assert all(r["trainers_accepted"] == 2 for r in rows[1:])
    # Two trainers each receive the adapter twice a round (train, evaluate) and send it once, at 4
    # or 2 bytes a value; headers add a few hundred bytes to this tiny model's 5 KB adapter.
    wire_share = {"float32": 1.0, "bfloat16": 0.5}[wire_dtype]
    for r in rows[1:]:
        assert 0 < r["train_compute_seconds"] <= r["train_seconds"]
        assert 0 < r["evaluate_compute_seconds"] <= r["evaluate_seconds"]
        assert 1.0 <= r["bytes_received"] / (2 * wire_share * r["adapter_bytes"]) < 1.2
        assert 1.0 <= r["bytes_sent"] / (4 * wire_share * r["adapter_bytes"]) < 1.2

    spans = list(coordinator_spans.get_finished_spans())
    for exporter in trainer_spans:
        spans += exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    rounds = {s.attributes["fl.round"]: s for s in spans if s.name == "fl.round"}
    assert sorted(rounds) == list(range(ROUNDS + 1))
    client_spans = [s for s in spans if s.name in ("fl.client.train", "fl.client.evaluate")]
    assert sum(s.name == "fl.client.train" for s in client_spans) == 2 * ROUNDS
    assert sum(s.name == "fl.client.evaluate" for s in client_spans) == 2 * (ROUNDS + 1)
    for span in client_spans:
        round_span = rounds[span.attributes["fl.round"]]
        assert span.context.trace_id == round_span.context.trace_id
        assert round_span in ancestors(span, by_id), f"{span.name} of round {span.attributes['fl.round']} is detached"
        assert span.resource.attributes["service.name"] == "phalanx-trainer"
    for number, span in rounds.items():
        assert {"fl.loss", "fl.accuracy"} <= set(span.attributes)
        if number > 0:
            assert span.attributes["fl.clients"] == 2

    names = {
        m.name
        for rm in metrics.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert {"fl.round.loss", "fl.round.accuracy", "fl.round.clients"} <= names
