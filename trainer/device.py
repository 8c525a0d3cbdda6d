"""Where a site computes and in what precision: `--device` and `--precision`, decided from what the hardware does.

The decisions are pure functions of `Capabilities`, so they are tested with any hardware
described; `probe()` reads this machine's. Autocast runs the matrix products in the low
precision while the weights, the optimiser state and the federated adapter stay float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from phalanx.cli import DEVICES, PRECISIONS
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ComputeError(ValueError):
    """A device or precision this machine cannot provide."""


@dataclass(frozen=True)
class Capabilities:
    """What the machine offers, as far as the choices below need to know."""

    cuda: bool = False
    cuda_bf16: bool = False
    """The CUDA device computes bf16 natively (Ampere or later)."""
    mps: bool = False
    cpu_bf16: bool = False
    """The CPU has bf16 instructions (AVX512-BF16 or AMX)."""
    cuda_name: str = ""


def probe() -> Capabilities:
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    cpu_bf16 = any(bool(getattr(torch.cpu, name, lambda: False)()) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return Capabilities(
        cuda=cuda,
        cuda_bf16=cuda and torch.cuda.is_bf16_supported(including_emulation=False),
        mps=mps,
        cpu_bf16=cpu_bf16,
        cuda_name=torch.cuda.get_device_name() if cuda else "",
    )


def select_device(requested: str, caps: Capabilities) -> str:
    """`auto`: CUDA, then MPS, then the CPU; a named device must exist."""
    if requested not in DEVICES:
        raise ComputeError(f"--device must be one of {', '.join(DEVICES)}")
    if requested == "auto":
        return "cuda" if caps.cuda else "mps" if caps.mps else "cpu"
    if requested == "cuda" and not caps.cuda:
        raise ComputeError("--device cuda: no CUDA device is available to this process")
    if requested == "mps" and not caps.mps:
        raise ComputeError("--device mps: the MPS backend is not available on this machine")
    return requested


def native_bf16(device: str, caps: Capabilities) -> bool:
    return caps.cuda_bf16 if device == "cuda" else caps.cpu_bf16 if device == "cpu" else False


def select_precision(requested: str, device: str, caps: Capabilities) -> str:
    """`auto`: bf16 autocast where `device` computes bf16 natively, float32 elsewhere.

    An explicit bf16 or fp16 is honoured (torch emulates what the hardware lacks, slowly).
    """
    if requested not in PRECISIONS:
        raise ComputeError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        return "bf16" if native_bf16(device, caps) else "fp32"
    return requested


@dataclass(frozen=True)
class Compute:
    """The device and precision a learner computes in."""

    device: torch.device
    precision: str

    @classmethod
    def choose(cls, device: str = "auto", precision: str = "auto", caps: Capabilities | None = None) -> Compute:
        caps = probe() if caps is None else caps
        chosen = select_device(device, caps)
        return cls(torch.device(chosen), select_precision(precision, chosen, caps))

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Run the forward pass in this precision (a no-op in fp32)."""
        dtype = _AUTOCAST_DTYPES.get(self.precision)
        if dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=dtype):
            yield

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling, on only for fp16, whose narrow range would flush small gradients to zero."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def accelerator(self, caps: Capabilities) -> str:
        """The device as a site reports it at registration: "cpu", "mps", or "cuda:NAME"."""
        if self.device.type == "cuda" and caps.cuda_name:
            return f"cuda:{caps.cuda_name}"
        return self.device.type

    def describe(self, caps: Capabilities) -> str:
        return f"{self.accelerator(caps)}, {self.precision}"
