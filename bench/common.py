"""What the benchmarks share: the machine header, a median timer, a memcpy baseline and adapter shapes."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

DEFAULT_PARAMS = 74_883
"""Parameters of the default adapter (MiniLM-L6, LoRA r=8 on query and value, a 3-label head)."""


def header(title: str) -> str:
    """Two comment lines naming the benchmark, the date and the machine."""
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return (
        f"# {title}, {now}\n"
        f"# {model}, {os.cpu_count()} cpus, python {platform.python_version()}, numpy {np.__version__}"
    )


def median_seconds(fn: Callable[[], object], repeats: int, min_seconds: float = 0.05) -> float:
    """Median seconds per call of `fn` over `repeats` timings, after one warm-up call.

    Each timing calls `fn` until at least `min_seconds` have passed, so fast calls are not lost
    in the timer's resolution.
    """
    fn()
    samples = []
    for _ in range(repeats):
        calls = 0
        start = time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        samples.append(elapsed / calls)
    return statistics.median(samples)


def memcpy_gbps(source: np.ndarray, repeats: int) -> float:
    """GB/s of `np.copyto` from `source` into a buffer of the same size (faulted in by the warm-up)."""
    target = np.empty_like(source)
    return source.nbytes / median_seconds(lambda: np.copyto(target, source), repeats) / 1e9


def adapter_shapes(
    params: int, hidden: int = 384, layers: int = 6, labels: int = 3
) -> dict[str, tuple[int, ...]]:
    """26 tensors shaped like the default adapter's, the LoRA rank scaled to give about `params`.

    `adapter_shapes(DEFAULT_PARAMS)` is the default adapter's layout exactly.
    """
    rank = max(1, round((params - labels * hidden - labels) / (4 * layers * hidden)))
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(layers):
        for module in ("query", "value"):
            prefix = f"encoder.layer.{layer}.attention.self.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, hidden)
            shapes[f"{prefix}.lora_B.weight"] = (hidden, rank)
    shapes["classifier.weight"] = (labels, hidden)
    shapes["classifier.bias"] = (labels,)
    return shapes


def make_adapters(
    shapes: dict[str, tuple[int, ...]], count: int, rng: np.random.Generator
) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """`count` adapters, each in its own memory, and the one float32 buffer that holds them all.

    The values are one random draw shifted by one element per adapter, so no two adapters are
    equal and none shares memory with another (caches cannot flatter the numbers).
    """
    size = sum(math.prod(s) for s in shapes.values())
    draw = rng.standard_normal(size + count, dtype=np.float32)
    store = np.empty(count * size, dtype=np.float32)
    adapters = []
    for k in range(count):
        flat = store[k * size : (k + 1) * size]
        flat[:] = draw[k : k + size]
        adapter, offset = {}, 0
        for name, shape in shapes.items():
            n = math.prod(shape)
            adapter[name] = flat[offset : offset + n].reshape(shape)
            offset += n
        adapters.append(adapter)
    return adapters, store


def quick_and_repeats(description: str, quick_help: str, argv: list[str] | None) -> tuple[bool, int]:
    """Parse the flags the throughput benchmarks share: --quick, and --repeats (default 5, quick 3)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--repeats", type=int, help="timings per median (default 5, quick 3)")
    args = parser.parse_args(argv)
    return args.quick, args.repeats or (3 if args.quick else 5)
