"""Echo trainers: the real trainer node and servicer, with local work that returns the adapter unchanged.

They measure what the coordinator and the wire cost per round when training costs nothing, and
stand in for sites in load and fault tests. They need no torch, so hundreds start in a second.

    python -m trainer.echo --coordinator 127.0.0.1:50051 --count 8 --params 74883

The coordinator must run with the same adapter layout: `synthetic_adapter(params, tensors)`.
With `--models`, the sites instead take the layout of those real backbones (LoRA settings as the
run asks), so they can serve the runs of a serving coordinator that name one of them.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from phalanx.model import ModelConfig
from phalanx.rpc import TlsCredentials
from trainer.jobs import EvalOutcome, StepCallback, Stopped, TrainOutcome
from trainer.learners import Learners

log = logging.getLogger("trainer.echo")

DEFAULT_PARAMS = 74_883
DEFAULT_TENSORS = 26


def synthetic_adapter(params: int = DEFAULT_PARAMS, tensors: int = DEFAULT_TENSORS, seed: int = 0) -> dict[str, np.ndarray]:
    """`params` float32 values split as evenly as possible over `tensors` named 2-D tensors."""
    rng = np.random.default_rng(seed)
    sizes = [params // tensors + (i < params % tensors) for i in range(tensors)]
    return {f"layer.{i}.weight": rng.standard_normal((1, n), dtype=np.float32) for i, n in enumerate(sizes)}


class EchoLearner:
    """Returns the received adapter (plus `shift` in every coordinate) after `delay` seconds,
    checking the stop flag while it waits."""

    def __init__(
        self,
        layout_adapter: Mapping[str, np.ndarray],
        num_train: int = 100,
        num_test: int = 20,
        delay: float = 0.0,
        shift: float = 0.0,
    ) -> None:
        self.layout_adapter = layout_adapter
        self.num_train_examples = num_train
        self.num_test_examples = num_test
        self.delay = delay
        self.shift = shift
        self.stopped_jobs = 0

    def train(
        self,
        adapter: Mapping[str, np.ndarray],
        *,
        steps: int,
        batch_size: int,
        learning_rate: float,
        seed: int,
        stop: threading.Event,
        batch_order: str = "grouped",
        proximal_mu: float = 0.0,
        freeze_lora_a: bool = False,
        on_step: StepCallback | None = None,
    ) -> TrainOutcome:
        started = time.perf_counter()
        if on_step is None:
            self._wait(stop)
        else:  # the delay spread over the steps, each reported as it ends
            for step in range(1, steps + 1):
                self._wait(stop, self.delay / steps)
                on_step(step, 1.0)
        if self.shift:
            adapter = {name: a + np.float32(self.shift) for name, a in adapter.items()}
        return TrainOutcome(adapter, loss=1.0, steps=steps, examples_seen=steps * batch_size, seconds=time.perf_counter() - started)

    def evaluate(
        self, adapter: Mapping[str, np.ndarray], *, batch_size: int, max_examples: int, stop: threading.Event
    ) -> EvalOutcome:
        started = time.perf_counter()
        self._wait(stop)
        n = min(self.num_test_examples, max_examples) if max_examples else self.num_test_examples
        return EvalOutcome(loss=1.0, accuracy=0.5, num_examples=n, seconds=time.perf_counter() - started)

    def _wait(self, stop: threading.Event, seconds: float | None = None) -> None:
        seconds = self.delay if seconds is None else seconds
        stopped = stop.wait(seconds) if seconds > 0 else stop.is_set()
        if stopped:
            self.stopped_jobs += 1
            raise Stopped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.echo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator", default="127.0.0.1:50051", help="coordinator address HOST:PORT")
    parser.add_argument("--count", type=int, default=1, help="echo trainers to run in this process")
    parser.add_argument("--first-partition", type=int, default=0, help="partition number of the first trainer")
    parser.add_argument("--listen", default="127.0.0.1:0", help="address of the first trainer (port 0: free ports)")
    parser.add_argument("--advertise", default="", help="address the coordinator should call (only with --count 1)")
    parser.add_argument("--params", type=int, default=DEFAULT_PARAMS, help="adapter parameters")
    parser.add_argument("--tensors", type=int, default=DEFAULT_TENSORS, help="adapter tensors")
    parser.add_argument("--labels", default="negative,neutral,positive", help="label names, comma-separated")
    parser.add_argument(
        "--models", default="", help="comma-separated backbones whose real adapter layouts the sites serve (needs torch)"
    )
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each job waits before it answers")
    parser.add_argument("--give-up-after", type=float, default=60.0, help="exit if the coordinator is unreachable this long")
    parser.add_argument(
        "--certs", type=Path, help="mutual TLS: a `python -m phalanx.pki` folder with ca.pem and echo-K.pem/.key per trainer"
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level")
    return parser


def echo_name(partition: int) -> str:
    return f"echo-{partition}"


def echo_credentials(certs: Path | None, partition: int) -> TlsCredentials | None:
    """The TLS files of echo trainer `partition` in a provisioned folder, or None for plaintext."""
    if certs is None:
        return None
    name = echo_name(partition)
    return TlsCredentials.load(certs / "ca.pem", certs / f"{name}.pem", certs / f"{name}.key")


@functools.cache
def model_layout(config: ModelConfig) -> dict[str, np.ndarray]:
    """The adapter of a real backbone with `config`'s LoRA settings: what a real site would send."""
    from phalanx.model import adapter_state, build_model

    return adapter_state(build_model(config))


def echo_learners(models: list[str], labels: tuple[str, ...], delay: float) -> Learners | None:
    """Learners that echo adapters laid out as `models` are, the first one's as the site's own; None without models."""
    if not models:
        return None
    own = ModelConfig(model=models[0], num_labels=len(labels))
    return Learners(
        EchoLearner(model_layout(own), delay=delay),
        own,
        labels,
        models=models,
        build=lambda config: EchoLearner(model_layout(config), delay=delay),
    )


async def serve(args: argparse.Namespace) -> None:
    from phalanx.telemetry import Telemetry
    from trainer.node import NodeConfig, TrainerNode

    layout = synthetic_adapter(args.params, args.tensors)
    labels = tuple(args.labels.split(","))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    learners = [await asyncio.to_thread(echo_learners, models, labels, args.delay) for _ in range(args.count)]
    host, port = args.listen.rsplit(":", 1)
    telemetry = Telemetry.create("phalanx-trainer")
    nodes = [
        TrainerNode(
            NodeConfig(
                partition=args.first_partition + i,
                coordinator=args.coordinator,
                listen=f"{host}:{int(port) + i if int(port) else 0}",
                advertise=args.advertise,
                name=echo_name(args.first_partition + i),
                give_up_after=args.give_up_after,
                tls=echo_credentials(args.certs, args.first_partition + i),
            ),
            learners[i].own if learners[i] is not None else EchoLearner(layout, delay=args.delay),
            telemetry,
            labels,
            learners=learners[i],
        )
        for i in range(args.count)
    ]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: [node.end_run("signal") for node in nodes])
    try:
        for node in nodes:
            await node.start()
        print(f"{args.count} echo trainers serving", flush=True)
        await asyncio.gather(*(node.run() for node in nodes))
    finally:
        await asyncio.gather(*(node.close() for node in nodes))
        telemetry.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.advertise and args.count != 1:
        build_parser().error("--advertise needs --count 1")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
