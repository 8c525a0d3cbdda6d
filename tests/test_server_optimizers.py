"""Server optimisers (Reddi et al. 2021): hand-computed steps, plain FedAvg as a special case, resume."""

from __future__ import annotations

import io
from math import sqrt

import numpy as np
import pytest

from coordinator.server_optimizers import (
    SERVER_OPTIMIZERS,
    ServerOptimizer,
    ServerOptimizerConfig,
    create_server_optimizer,
)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


# Two rounds shared by the hand-computed cases: Δ1 = [1.2, -0.375], Δ2 = [0, 0.375].
ROUNDS = [
    ({"w": f32(1.0, 2.0)}, {"w": f32(2.2, 1.625)}),
    ({"w": f32(3.0, -1.0)}, {"w": f32(3.0, -0.625)}),
]


def run_rounds(config: ServerOptimizerConfig) -> list[np.ndarray]:
    optimizer = create_server_optimizer(config, ROUNDS[0][0])
    assert optimizer is not None
    return [optimizer.step(current, aggregate)["w"] for current, aggregate in ROUNDS]


def test_fedavgm_two_steps_by_hand() -> None:
    x1, x2 = run_rounds(ServerOptimizerConfig("fedavgm", lr=0.5, momentum=0.5))
    # m1 = Δ1 = [1.2, -0.375];             x1 = [1, 2] + 0.5·m1
    # m2 = 0.5·m1 + Δ2 = [0.6, 0.1875];    x2 = [3, -1] + 0.5·m2
    np.testing.assert_allclose(x1, [1.6, 1.8125], rtol=1e-6)
    np.testing.assert_allclose(x2, [3.3, -0.90625], rtol=1e-6)
    assert x1.dtype == np.float32


# β1 = 0.5, β2 = 0.75, τ = 0.5 (so v0 = 0.25), η = 1; m1 = 0.5·Δ1 = [0.6, -0.1875], m2 = [0.3, 0.09375].
ADAPTIVE = {"lr": 1.0, "beta1": 0.5, "beta2": 0.75, "tau": 0.5}


def test_fedadagrad_two_steps_by_hand() -> None:
    x1, x2 = run_rounds(ServerOptimizerConfig("fedadagrad", **ADAPTIVE))
    # v1 = 0.25 + Δ1² = [1.69, 0.390625], √v1 = [1.3, 0.625];  v2 = v1 + Δ2² = [1.69, 0.53125]
    np.testing.assert_allclose(x1, [1 + 0.6 / 1.8, 2 - 0.1875 / 1.125], rtol=1e-6)
    np.testing.assert_allclose(x2, [3 + 0.3 / 1.8, -1 + 0.09375 / (sqrt(0.53125) + 0.5)], rtol=1e-6)


def test_fedadam_two_steps_by_hand() -> None:
    x1, x2 = run_rounds(ServerOptimizerConfig("fedadam", **ADAPTIVE))
    # v1 = 0.75·0.25 + 0.25·Δ1² = [0.5475, 0.22265625];  v2 = 0.75·v1 + 0.25·Δ2² = [0.410625, 0.2021484375]
    np.testing.assert_allclose(
        x1, [1 + 0.6 / (sqrt(0.5475) + 0.5), 2 - 0.1875 / (sqrt(0.22265625) + 0.5)], rtol=1e-6
    )
    np.testing.assert_allclose(
        x2, [3 + 0.3 / (sqrt(0.410625) + 0.5), -1 + 0.09375 / (sqrt(0.2021484375) + 0.5)], rtol=1e-6
    )


def test_fedyogi_two_steps_by_hand() -> None:
    x1, x2 = run_rounds(ServerOptimizerConfig("fedyogi", **ADAPTIVE))
    # v1 = 0.25 − 0.25·Δ1²·sign(0.25 − Δ1²) = [0.25 + 0.36, 0.25 − 0.03515625] = [0.61, 0.21484375]
    # v2 = v1 − 0.25·Δ2²·sign(v1 − Δ2²) = [0.61, 0.21484375 − 0.03515625] = [0.61, 0.1796875]
    np.testing.assert_allclose(
        x1, [1 + 0.6 / (sqrt(0.61) + 0.5), 2 - 0.1875 / (sqrt(0.21484375) + 0.5)], rtol=1e-6
    )
    np.testing.assert_allclose(
        x2, [3 + 0.3 / (sqrt(0.61) + 0.5), -1 + 0.09375 / (sqrt(0.1796875) + 0.5)], rtol=1e-6
    )


def test_fedavgm_without_momentum_at_unit_rate_is_plain_fedavg() -> None:
    rng = np.random.default_rng(0)
    current = {
        "a": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float32),
    }
    optimizer = create_server_optimizer(ServerOptimizerConfig("fedavgm", lr=1.0, momentum=0.0), current)
    assert optimizer is not None
    for _ in range(3):
        aggregate = {k: (v + rng.standard_normal(v.shape)).astype(np.float32) for k, v in current.items()}
        out = optimizer.step(current, aggregate)
        for key in current:
            np.testing.assert_allclose(out[key], aggregate[key], rtol=0, atol=1e-6)
        current = out
    assert optimizer.steps == 3


def test_step_does_not_modify_its_inputs() -> None:
    current, aggregate = {"w": f32(1.0, 2.0)}, {"w": f32(3.0, 5.0)}
    optimizer = ServerOptimizer(ServerOptimizerConfig("fedadam"), current)
    optimizer.step(current, aggregate)
    np.testing.assert_array_equal(current["w"], [1.0, 2.0])
    np.testing.assert_array_equal(aggregate["w"], [3.0, 5.0])


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS[1:])
def test_resuming_from_state_continues_bit_identically(name: str) -> None:
    rng = np.random.default_rng(7)
    shapes = {"lora_A": (2, 3), "lora_B": (3, 2), "head": (4,)}
    rounds = [
        tuple({k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(2))
        for _ in range(3)
    ]
    config = ServerOptimizerConfig(name)
    straight = ServerOptimizer(config, rounds[0][0])
    outputs = [straight.step(*r) for r in rounds]

    first = ServerOptimizer(config, rounds[0][0])
    first.step(*rounds[0])
    saved = io.BytesIO()
    np.savez(saved, **first.state())
    saved.seek(0)
    resumed = ServerOptimizer(config, rounds[0][0])
    with np.load(saved) as state:
        resumed.load_state(dict(state))
    assert resumed.steps == 1
    for r, expected in zip(rounds[1:], outputs[1:]):
        out = resumed.step(*r)
        assert all(out[k].tobytes() == expected[k].tobytes() for k in shapes)
    final, resumed_final = straight.state(), resumed.state()
    assert final.keys() == resumed_final.keys()
    assert all(final[k].tobytes() == resumed_final[k].tobytes() for k in final)


def test_state_names_and_dtypes() -> None:
    optimizer = ServerOptimizer(ServerOptimizerConfig("fedyogi", tau=0.5), {"w": np.zeros(2)})
    state = optimizer.state()
    assert sorted(state) == ["m/w", "steps", "v/w"]
    assert state["m/w"].dtype == np.float32 and state["steps"].dtype == np.int64
    np.testing.assert_array_equal(state["v/w"], [0.25, 0.25])  # v starts at τ²
    assert sorted(ServerOptimizer(ServerOptimizerConfig("fedavgm"), {"w": np.zeros(2)}).state()) == [
        "m/w",
        "steps",
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("v/w"), "lacks 'v/w'"),
        (lambda s: s.pop("steps"), "lacks 'steps'"),
        (
            lambda s: s.update({"m/w": np.zeros(3, dtype=np.float32)}),
            r"'m/w' has shape \(3,\), expected \(2,\)",
        ),
        (lambda s: s.update({"m/x": np.zeros(2, dtype=np.float32)}), "unexpected entries 'm/x'"),
    ],
)
def test_load_state_refuses_missing_misshapen_or_unexpected_entries(change, message) -> None:
    optimizer = ServerOptimizer(ServerOptimizerConfig("fedadam"), {"w": np.zeros(2)})
    optimizer.step({"w": f32(0.0, 0.0)}, {"w": f32(1.0, 1.0)})
    state = optimizer.state()
    change(state)
    fresh = ServerOptimizer(ServerOptimizerConfig("fedadam"), {"w": np.zeros(2)})
    with pytest.raises(ValueError, match=message):
        fresh.load_state(state)
    assert fresh.steps == 0


def test_step_refuses_a_mismatched_adapter() -> None:
    optimizer = ServerOptimizer(ServerOptimizerConfig("fedavgm"), {"w": np.zeros(2)})
    with pytest.raises(ValueError, match="aggregate adapter lacks tensor 'w'"):
        optimizer.step({"w": f32(0.0, 0.0)}, {})
    with pytest.raises(ValueError, match=r"current tensor 'w' has shape \(3,\)"):
        optimizer.step({"w": np.zeros(3)}, {"w": f32(0.0, 0.0)})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (ServerOptimizerConfig("fedsgd"), "unknown server optimiser 'fedsgd'"),
        (ServerOptimizerConfig("fedadam", lr=-0.1), "learning rate must be finite and >= 0"),
        (ServerOptimizerConfig("fedavgm", momentum=1.0), r"momentum must be in \[0, 1\)"),
        (ServerOptimizerConfig("fedadam", beta1=-0.1), r"beta1 must be in \[0, 1\)"),
        (ServerOptimizerConfig("fedyogi", beta2=1.0), r"beta2 must be in \[0, 1\)"),
        (ServerOptimizerConfig("fedadagrad", tau=0.0), "tau must be finite and > 0"),
    ],
)
def test_create_refuses_bad_configurations(config: ServerOptimizerConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_server_optimizer(config, {"w": np.zeros(1)})


def test_none_means_no_optimiser_and_defaults_fill_a_zero_rate() -> None:
    assert create_server_optimizer(ServerOptimizerConfig(), {"w": np.zeros(1)}) is None
    with pytest.raises(ValueError, match="'none'"):
        ServerOptimizer(ServerOptimizerConfig("none"), {"w": np.zeros(1)})
    assert ServerOptimizerConfig("fedavgm").effective_lr == 1.0
    assert [ServerOptimizerConfig(n).effective_lr for n in ("fedadam", "fedyogi", "fedadagrad")] == [0.01] * 3
    assert ServerOptimizerConfig("fedadam", lr=0.5).effective_lr == 0.5
