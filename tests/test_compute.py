"""Where a site computes: device and precision decisions, autocast, and the trainer's flags."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from phalanx.model import ModelConfig
from phalanx.data import TextDataset
from phalanx.partition import Partition
from trainer.device import Capabilities, Compute, ComputeError, probe, select_device, select_precision
from trainer.learner import Learner

NOTHING = Capabilities()
CUDA_AMPERE = Capabilities(cuda=True, cuda_bf16=True, cpu_bf16=True)
CUDA_VOLTA = Capabilities(cuda=True, cuda_bf16=False)
APPLE = Capabilities(mps=True)
BF16_CPU = Capabilities(cpu_bf16=True)


@pytest.mark.parametrize(
    ("caps", "expected"), [(NOTHING, "cpu"), (BF16_CPU, "cpu"), (CUDA_VOLTA, "cuda"), (APPLE, "mps"), (Capabilities(cuda=True, mps=True), "cuda")]
)
def test_auto_takes_cuda_then_mps_then_the_cpu(caps: Capabilities, expected: str) -> None:
    assert select_device("auto", caps) == expected


def test_a_named_device_is_honoured_and_a_missing_one_refused() -> None:
    assert select_device("cpu", CUDA_AMPERE) == "cpu"
    assert select_device("mps", APPLE) == "mps"
    with pytest.raises(ComputeError, match="no CUDA device"):
        select_device("cuda", APPLE)
    with pytest.raises(ComputeError, match="MPS backend is not available"):
        select_device("mps", CUDA_AMPERE)
    with pytest.raises(ComputeError, match="must be one of"):
        select_device("tpu", NOTHING)


def test_this_machine_picks_what_torch_reports_and_the_cpu_when_asked() -> None:
    caps = probe()
    expected = "cuda" if torch.cuda.is_available() else "mps" if caps.mps else "cpu"
    assert Compute.choose("auto", "auto", caps).device.type == expected
    assert Compute.choose("cpu", "fp32", caps) == Compute(torch.device("cpu"), "fp32")
    if not torch.cuda.is_available():
        with pytest.raises(ComputeError):
            Compute.choose("cuda", "auto", caps)


@pytest.mark.parametrize(
    ("device", "caps", "expected"),
    [
        ("cpu", BF16_CPU, "bf16"),  # AVX512-BF16 or AMX
        ("cpu", NOTHING, "fp32"),
        ("cpu", CUDA_VOLTA, "fp32"),  # a GPU's abilities say nothing of the CPU's
        ("cuda", CUDA_AMPERE, "bf16"),
        ("cuda", CUDA_VOLTA, "fp32"),
        ("cuda", Capabilities(cuda=True, cpu_bf16=True), "fp32"),  # nor the CPU's of the GPU's
        ("mps", Capabilities(mps=True, cpu_bf16=True), "fp32"),
    ],
)
def test_auto_precision_is_bf16_only_where_the_device_does_it_natively(device: str, caps: Capabilities, expected: str) -> None:
    assert select_precision("auto", device, caps) == expected


def test_an_explicit_precision_is_honoured() -> None:
    assert select_precision("fp32", "cuda", CUDA_AMPERE) == "fp32"
    assert select_precision("bf16", "cpu", NOTHING) == "bf16"
    assert select_precision("fp16", "cuda", CUDA_VOLTA) == "fp16"
    with pytest.raises(ComputeError):
        select_precision("int8", "cpu", NOTHING)


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_autocast_computes_in_the_precision_and_leaves_weights_float32(precision: str, dtype: torch.dtype) -> None:
    layer = torch.nn.Linear(8, 4)
    with Compute(torch.device("cpu"), precision).autocast():
        out = layer(torch.ones(2, 8))
    assert out.dtype == dtype
    assert layer.weight.dtype == torch.float32
    assert Compute(torch.device("cpu"), precision).grad_scaler().is_enabled() is False
    assert Compute(torch.device("cpu"), "fp16").grad_scaler().is_enabled() is True


def _site(n: int) -> Partition:
    rng = np.random.default_rng(0)
    words = ["bad awful", "table door", "good great"]
    labels = np.arange(n) % 3
    texts = tuple(" ".join([words[k]] * int(rng.integers(1, 6))) + f" {i}" for i, k in enumerate(labels))
    split = TextDataset(texts=texts, labels=labels, label_names=("negative", "neutral", "positive"))
    return Partition(train=split, test=split)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_learner_trains_in_either_precision_and_sends_float32_deterministically(tiny_model_dir: Path, precision: str) -> None:
    learner = Learner(ModelConfig(model=str(tiny_model_dir), max_length=16), _site(90), Compute(torch.device("cpu"), precision))
    start = learner.layout_adapter
    train = {"steps": 4, "batch_size": 8, "learning_rate": 1e-2, "seed": 7, "stop": threading.Event()}
    first, again = learner.train(start, **train), learner.train(start, **train)
    assert all(a.dtype == np.float32 for a in first.adapter.values())
    assert any(not np.array_equal(first.adapter[k], start[k]) for k in start)
    # The same seed from the same adapter gives the same bits: what a resumed round relies on.
    assert all(first.adapter[k].tobytes() == again.adapter[k].tobytes() for k in start)
    assert np.isfinite(first.loss) and first.loss == again.loss
    evaluation = learner.evaluate(first.adapter, batch_size=16, max_examples=0, stop=threading.Event())
    assert evaluation.num_examples == 90 and np.isfinite(evaluation.loss) and 0 <= evaluation.accuracy <= 1


def test_trainer_refuses_a_device_it_lacks_at_once_and_logs_its_choice() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    started = time.monotonic()
    missing = subprocess.run(
        [sys.executable, "-m", "trainer", "--partition", "0", "--device", "cuda", "--insecure"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert missing.returncode == 2
    assert "--device cuda: no CUDA device is available" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert time.monotonic() - started < 60  # before loading data or a model
