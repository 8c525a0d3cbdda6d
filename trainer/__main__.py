"""python -m trainer --partition k: one site of a Phalanx federation."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from phalanx.cli import (
    HelpFormatter,
    add_common_arguments,
    configure_logging,
    data_config,
    model_config,
    parse_with_config,
    tls_credentials,
)
from phalanx.codec import DEFAULT_MAX_ADAPTER_BYTES
from phalanx.model import missing_model_directory
from phalanx.rpc import TlsCredentials, check_plaintext
from trainer.learners import DEFAULT_CAPACITY
from trainer.service import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_LOCAL_STEPS, WorkLimits

log = logging.getLogger("trainer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--partition", type=int, required=True, help="which partition of the data this site holds")
    parser.add_argument("--num-partitions", type=int, default=1, help="how many sites split the data set")
    parser.add_argument("--coordinator", default="127.0.0.1:50051", help="coordinator address HOST:PORT")
    parser.add_argument("--listen", default="127.0.0.1:0", help="address to serve on (port 0: a free port)")
    parser.add_argument("--advertise", default="", help="address the coordinator should call (default: listen address)")
    parser.add_argument("--name", default="", help="stable site name (default: partition-K)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--give-up-after", type=float, default=300.0, help="exit if the coordinator is unreachable this long")
    parser.add_argument("--max-adapter-bytes", type=int, default=DEFAULT_MAX_ADAPTER_BYTES, help="largest adapter accepted")
    parser.add_argument(
        "--max-local-steps", type=int, default=DEFAULT_MAX_LOCAL_STEPS, help="most optimizer steps one request may ask for"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE, help="largest batch one request may ask for"
    )
    parser.add_argument(
        "--models", default="",
        help="comma-separated backbones this site may load for the runs of a serving coordinator, besides --model",
    )  # fmt: skip
    parser.add_argument(
        "--max-learners", type=int, default=DEFAULT_CAPACITY, help="run models kept loaded at once (serving coordinator)"
    )
    add_common_arguments(parser)
    return parser


async def serve(args: argparse.Namespace, tls: TlsCredentials | None) -> str:
    from phalanx.sites import load_site
    from phalanx.telemetry import Telemetry
    from trainer.device import Compute, probe
    from trainer.learner import Learner
    from trainer.learners import Learners
    from trainer.node import NodeConfig, TrainerNode

    caps = probe()
    compute = Compute.choose(args.device, args.precision, caps)  # a ComputeError before anything slow
    log.info("computing on %s (--device %s, --precision %s)", compute.describe(caps), args.device, args.precision)
    data = data_config(args)
    site = await asyncio.to_thread(load_site, data, args.partition, args.num_partitions)
    labels = site.train.label_names
    own_config = model_config(args, len(labels))
    learner = await asyncio.to_thread(Learner, own_config, site, compute)
    learners = Learners(
        learner,
        own_config,
        labels,
        models=[m.strip() for m in args.models.split(",") if m.strip()],
        build=lambda config: Learner(config, site, compute),
        capacity=args.max_learners,
    )
    log.info("partition %d: %d train / %d test examples", args.partition, len(site.train), len(site.test))
    telemetry = Telemetry.create("phalanx-trainer", attributes={"fl.partition": args.partition})
    node = TrainerNode(
        NodeConfig(
            partition=args.partition,
            coordinator=args.coordinator,
            listen=args.listen,
            advertise=args.advertise,
            name=args.name,
            give_up_after=args.give_up_after,
            max_adapter_bytes=args.max_adapter_bytes,
            tls=tls,
            limits=WorkLimits(max_local_steps=args.max_local_steps, max_batch_size=args.max_batch_size),
            accelerator=compute.accelerator(caps),
            cores=args.threads,
        ),
        learner,
        telemetry,
        labels,
        learners=learners,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, node.end_run, f"signal {signal.Signals(sig).name}")
    try:
        await node.start()
        return await node.run()
    finally:
        await node.close()
        telemetry.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_with_config(parser, argv)
    if args.max_local_steps < 1 or args.max_batch_size < 1 or args.max_learners < 1:
        parser.error("--max-local-steps, --max-batch-size and --max-learners must be at least 1")
    for model in [args.model, *(m.strip() for m in args.models.split(",") if m.strip())]:
        if problem := missing_model_directory(model):
            parser.error(problem)  # at once, not after loading data and a model
    tls = tls_credentials(parser, args)
    try:
        check_plaintext(args.listen, tls, args.insecure, listening=True)
        check_plaintext(args.coordinator, tls, args.insecure, listening=False)
    except ValueError as exc:  # TlsError, or an address that is not host:port
        parser.error(str(exc))
    configure_logging(args.log_level, f"trainer[{args.partition}]")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    from phalanx.data import DataError
    from phalanx.model import ModelError
    from trainer.node import CoordinatorUnreachable, RegistrationRefused

    try:
        reason = asyncio.run(serve(args, tls))
    except (DataError, ModelError, ValueError, RegistrationRefused, CoordinatorUnreachable) as exc:
        log.error("%s", exc)
        return 2
    log.info("exiting: %s", reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
