"""python -m coordinator: run a Phalanx federation.

Trainers register with this process; it runs --rounds federated rounds over them and writes
metrics.jsonl, checkpoints/ and the final PEFT adapter/ into --out. With --spawn-trainers N it
also starts N local trainers on partitions 0..N-1 of --data, so one command runs a whole
federation. A run whose --out holds a checkpoint resumes after its last completed round.

With --serve it keeps the federation instead and runs what is submitted to it, several at once,
with its state in --state-dir (runs, rows, checkpoints, logs) and JSON status on --http:

    python -m coordinator --serve --listen 127.0.0.1:50051 --http 127.0.0.1:8080 --state-dir state
    python -m coordinator submit RUN.toml       # prints the run id last
    python -m coordinator runs | stop RUN_ID | logs RUN_ID [--follow]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from phalanx.cli import (
    HelpFormatter,
    add_common_arguments,
    compute_flags,
    configure_logging,
    data_config,
    label_names,
    model_and_data_flags,
    model_config,
    parse_with_config,
    tls_credentials,
)
from coordinator.config import CoordinatorConfig, FederationConfig
from coordinator.registry import RegistryLimits
from coordinator.run_config import add_run_arguments, round_config, run_problems
from coordinator.spawn import SpawnedPki, TrainerProcesses, provision_spawned
from phalanx.codec import DEFAULT_MAX_ADAPTER_BYTES
from phalanx.identity import check_address, is_loopback
from phalanx.model import missing_model_directory
from phalanx.rpc import TlsCredentials, check_plaintext

log = logging.getLogger("coordinator")
ADMIN_COMMANDS = ("submit", "runs", "stop", "logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m coordinator", description=__doc__, formatter_class=HelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--listen", default="127.0.0.1:50051", help="address to serve on, HOST:PORT (port 0: a free port)")
    run.add_argument("--out", type=Path, default=Path("runs/latest"), help="directory for metrics, checkpoints, adapter")
    run.add_argument("--fresh", action="store_true", help="ignore and remove an earlier run's outputs in --out")
    run.add_argument("--spawn-trainers", type=int, default=0, help="start N local trainers on partitions 0..N-1")
    run.add_argument("--trainer-threads", type=int, default=0, help="torch threads per spawned trainer (0: cores / N)")
    run.add_argument("--register-timeout", type=float, default=300.0, help="seconds to wait for --min-trainers")
    run.add_argument(
        "--shutdown-grace", type=float, default=30.0, help="on SIGTERM/SIGINT, seconds the round in flight may finish in"
    )
    run.add_argument("--max-transfers", type=int, default=16, help="adapters streamed at once (bounds memory)")
    run.add_argument("--max-adapter-bytes", type=int, default=DEFAULT_MAX_ADAPTER_BYTES, help="largest reply accepted")
    run.add_argument(
        "--allow-sites", type=Path, help="file of site names that may join, one a line (`NAME [MAX_WEIGHT]`); re-read on change"
    )
    run.add_argument(
        "--max-trainers", type=int, default=RegistryLimits.max_trainers, help="most registered trainers at once"
    )
    serving = parser.add_argument_group("serving", "a federation that runs what is submitted to it (see above)")
    serving.add_argument("--serve", action="store_true", help="keep the federation and serve submitted runs")
    serving.add_argument("--state-dir", type=Path, default=Path("phalanx-state"), help="runs, rows, checkpoints and logs")
    serving.add_argument("--http", default="", help="serve JSON status on HOST:PORT (port 0: a free port); off if empty")
    serving.add_argument("--max-runs", type=int, default=4, help="runs executed at once; later ones wait, pending")
    add_run_arguments(parser)
    add_common_arguments(parser)
    return parser


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace, tls: TlsCredentials | None) -> None:
    checks = [
        (args.max_transfers >= 1, "--max-transfers must be at least 1"),
        (args.shutdown_grace >= 0, "--shutdown-grace cannot be negative"),
        (args.spawn_trainers >= 0, "--spawn-trainers cannot be negative"),
        (
            args.spawn_trainers == 0 or args.serve or args.spawn_trainers >= args.min_trainers,
            "--spawn-trainers must be at least --min-trainers",
        ),
        (args.max_trainers >= 1, "--max-trainers must be at least 1"),
        (
            args.spawn_trainers == 0 or not any([args.ca, args.cert, args.key]),
            "--spawn-trainers provisions its own throwaway CA under --out; drop --ca/--cert/--key",
        ),
        (args.max_runs >= 1, "--max-runs must be at least 1"),
        (not args.http or args.serve, "--http needs --serve"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    if not args.serve:
        for message in run_problems(args, can_sign=tls is not None or (args.spawn_trainers > 0 and not args.insecure)):
            parser.error(message)
    try:
        # --spawn-trainers provisions its own certificates unless --insecure: either way plaintext is chosen or avoided.
        check_plaintext(args.listen, tls, args.insecure or args.spawn_trainers > 0, listening=True)
        if args.http:
            check_plaintext(args.http, tls, args.insecure or args.spawn_trainers > 0, listening=True)
    except ValueError as exc:  # TlsError, or an address that is not host:port
        parser.error(str(exc))


def clear_outputs(out: Path) -> None:
    for name in ("metrics.jsonl", "checkpoints", "adapter", "logs", "pki"):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


async def spawn_trainers(args: argparse.Namespace, address: str, log_dir: Path, pki: SpawnedPki | None) -> TrainerProcesses:
    """Start --spawn-trainers local sites with this run's model, data and compute flags; they share the cores."""
    threads = args.trainer_threads or max(1, (os.cpu_count() or 1) // args.spawn_trainers)
    spawned = TrainerProcesses(
        args.spawn_trainers, address, [*model_and_data_flags(args), *compute_flags(args)], log_dir, threads, pki
    )
    await spawned.start()
    return spawned


async def coordinate(args: argparse.Namespace, tls: TlsCredentials | None) -> int:
    from coordinator.app import CoordinatorApp
    from coordinator.run import RoundFailed
    from coordinator.outputs import RunOutputs
    from coordinator.plots import plot_run
    from coordinator.report import Report
    from phalanx.model import adapter_state, build_model, save_adapter
    from phalanx.sites import load_source, split_holdout
    from phalanx.telemetry import Telemetry

    started = time.perf_counter()
    report = Report(args.rounds)
    labels = label_names(args) or (await asyncio.to_thread(load_source, data_config(args))).label_names
    if args.holdout_rows:
        await asyncio.to_thread(split_holdout, data_config(args))  # a DataError now, not in every spawned site
    if args.fresh:
        clear_outputs(args.out)
    spawn_pki = None
    if args.spawn_trainers and not args.insecure:
        spawn_pki = await asyncio.to_thread(provision_spawned, args.out / "pki", args.spawn_trainers, args.listen)
        tls = spawn_pki.coordinator
        report.say(f"Mutual TLS with a throwaway CA in {spawn_pki.directory} (--insecure for plaintext).")
    config = CoordinatorConfig(
        rounds=round_config(args),
        model=model_config(args, len(labels)),
        label_names=labels,
        listen=args.listen,
        out=args.out,
        start_with=args.spawn_trainers,
        register_timeout=args.register_timeout,
        max_adapter_bytes=args.max_adapter_bytes,
        max_transfers=args.max_transfers,
        tls=tls,
        insecure=args.insecure,
        allow_sites=args.allow_sites,
        registry=RegistryLimits(max_trainers=args.max_trainers),
    )
    if args.secure_aggregation:
        report.say("Secure aggregation (SecAgg+): the coordinator learns only the weighted sum of each round's updates.")
    outputs = RunOutputs(args.out)
    model = await asyncio.to_thread(build_model, config.model)
    adapter = adapter_state(model)
    run_id, start_round, resumed = uuid.uuid4().hex, 1, None
    checkpoint = outputs.load_latest_checkpoint()
    if checkpoint is not None:
        run_id, start_round, adapter = checkpoint.metadata.get("run_id", run_id), checkpoint.round + 1, checkpoint.adapter
        resumed = checkpoint.metadata
        outputs.truncate_metrics(checkpoint.round)
        report.say(f"Resuming after round {checkpoint.round} from the checkpoint in {args.out} (--fresh starts over).")
    else:
        outputs.truncate_metrics(-1)
    report.say(
        f"Labels {list(labels)}; adapter of {len(adapter)} tensors, {sum(a.size for a in adapter.values()):,} parameters."
    )

    telemetry = Telemetry.create("phalanx-coordinator")
    app = CoordinatorApp(
        config, telemetry, outputs, adapter, run_id=run_id, start_round=start_round, on_round=report.round_done,
        resumed=resumed,
    )  # fmt: skip
    spawned: TrainerProcesses | None = None
    stopped_by: list[str] = []
    exit_code = 1
    try:
        address = await app.start()
        report.say(f"Coordinator listening on {address}; waiting for {max(args.min_trainers, args.spawn_trainers)} trainers.")
        run = asyncio.ensure_future(app.execute())
        loop = asyncio.get_running_loop()

        def stop(sig: signal.Signals) -> None:
            """First signal: stop serving new work, let the round finish within the grace period. Second: stop now."""
            stopped_by.append(sig.name)
            if len(stopped_by) > 1 or app.waiting_for_trainers:
                run.cancel()
                return
            report.say(f"{sig.name}: finishing the round in flight (at most {args.shutdown_grace:.0f} s), then stopping.")
            app.stop_after_round()
            loop.call_later(args.shutdown_grace, run.cancel)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig)
        if args.spawn_trainers:
            spawned = await spawn_trainers(args, address, args.out / "logs", spawn_pki)
            report.say(
                f"Started {args.spawn_trainers} trainers ({spawned.threads} torch threads each, --device {args.device}, "
                f"--precision {args.precision}); logs in {args.out / 'logs'}."
            )
            early_exit = asyncio.ensure_future(spawned.first_exit())
            done, _ = await asyncio.wait({run, early_exit}, return_when=asyncio.FIRST_COMPLETED)
            if run not in done and app.waiting_for_trainers:
                run.cancel()
                raise RuntimeError(early_exit.result())
            early_exit.cancel()
        await run
        if stopped_by:
            raise asyncio.CancelledError
        await asyncio.to_thread(save_adapter, model, app.run.adapter, outputs.adapter_dir)
        rows = outputs.read_metrics()
        await asyncio.to_thread(plot_run, rows, args.out / "plot.png", f"run {app.run.run_id}")
        report.summary(rows, str(args.out), time.perf_counter() - started, app.run.stop_reason, logs=spawned is not None)
        exit_code = 0
    except asyncio.CancelledError:
        if not stopped_by:
            raise
        done = app.run.completed_rounds
        report.say(f"Stopped by {stopped_by[0]} after round {done}; run again with the same --out to resume.")
        exit_code = 0 if stopped_by[0] == "SIGTERM" else 130
    except RoundFailed as exc:
        report.say(f"Run failed: {exc}")
    except TimeoutError:
        report.say(f"Run failed: fewer than {args.min_trainers} trainers registered within {args.register_timeout:.0f} s.")
    except RuntimeError as exc:
        report.say(f"Run failed: {exc}")
    finally:
        await app.close("finished" if exit_code == 0 and not stopped_by else "the coordinator stopped")
        if spawned is not None:
            await spawned.stop()
        telemetry.shutdown()
    return exit_code


async def serve(args: argparse.Namespace, tls: TlsCredentials | None) -> int:
    """Serve the federation and its runs until SIGINT or SIGTERM; the runs in flight resume at the next start."""
    from coordinator.admin import AdminAccess, RunServicer
    from coordinator.http import StatusServer
    from coordinator.serving import ServingCoordinator
    from phalanx.telemetry import Telemetry
    from phalanx.v1 import run_pb2_grpc

    spawn_pki = None
    if args.spawn_trainers and not args.insecure:
        spawn_pki = await asyncio.to_thread(provision_spawned, args.state_dir / "pki", args.spawn_trainers, args.listen)
        tls = spawn_pki.coordinator
    config = FederationConfig(
        listen=args.listen,
        max_adapter_bytes=args.max_adapter_bytes,
        max_transfers=args.max_transfers,
        tls=tls,
        insecure=args.insecure,
        allow_sites=args.allow_sites,
        registry=RegistryLimits(max_trainers=args.max_trainers),
    )
    hosts = [check_address(a, listening=True)[0] for a in (args.listen, args.http) if a]
    access = AdminAccess(tls=tls is not None, loopback_only=all(is_loopback(h) for h in hosts))
    telemetry = Telemetry.create("phalanx-coordinator")
    coordinator = ServingCoordinator(config, telemetry, args.state_dir, max_runs=args.max_runs, can_sign=tls is not None)
    run_pb2_grpc.add_RunServiceServicer_to_server(RunServicer(coordinator, access), coordinator.federation.server.grpc_server)
    status = StatusServer(coordinator, access, tls) if args.http else None
    spawned: TrainerProcesses | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        address = await coordinator.start()
        print(f"Coordinator serving runs on {address}; state in {args.state_dir}", flush=True)
        if status is not None:
            print(f"Status over HTTP at {await status.start(args.http)}", flush=True)
        if not access.open and not access.tls:
            print("Admin calls are refused: without TLS only a loopback-only coordinator takes them.", flush=True)
        if args.spawn_trainers:
            spawned = await spawn_trainers(args, address, args.state_dir / "logs", spawn_pki)
            print(f"Started {args.spawn_trainers} trainers; logs in {args.state_dir / 'logs'}", flush=True)
        await stop.wait()
        print("Stopping; unfinished runs resume at the next start.", flush=True)
    finally:
        if status is not None:
            await status.close()
        await coordinator.close()
        if spawned is not None:
            await spawned.stop(timeout=0)
        telemetry.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ADMIN_COMMANDS:
        from coordinator.admin_cli import main as admin_main

        return admin_main(argv)
    parser = build_parser()
    args = parse_with_config(parser, argv)
    if problem := missing_model_directory(args.model):
        parser.error(problem)  # at once, not after loading data and a model
    tls = tls_credentials(parser, args)
    validate(parser, args, tls)
    configure_logging(args.log_level, "coordinator")
    if args.serve:
        return asyncio.run(serve(args, tls))
    from coordinator.allowlist import AllowlistError
    from coordinator.outputs import CheckpointError
    from phalanx.data import DataError
    from phalanx.model import ModelError

    try:
        return asyncio.run(coordinate(args, tls))
    except (DataError, ModelError, CheckpointError, AllowlistError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
