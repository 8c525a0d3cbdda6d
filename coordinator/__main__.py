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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorConfig, FederationConfig
from coordinator.outputs import RunOutputs
from coordinator.registry import RegistryLimits
from coordinator.report import Report
from coordinator.run_config import add_run_arguments, round_config, run_problems
from coordinator.spawn import SpawnedPki, TrainerProcesses, provision_spawned
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
from phalanx.codec import DEFAULT_MAX_ADAPTER_BYTES
from phalanx.identity import check_address, is_loopback
from phalanx.model import missing_model_directory
from phalanx.rpc import TlsCredentials, check_plaintext, check_port_free

log = logging.getLogger("coordinator")
ADMIN_COMMANDS = ("submit", "runs", "stop", "logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m coordinator", description=__doc__, formatter_class=HelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--listen", default="127.0.0.1:50051", help="address to serve on, HOST:PORT (port 0: a free port)")
    run.add_argument("--out", type=Path, default=Path("runs/latest"), help="directory for metrics, checkpoints, adapter")
    run.add_argument("--fresh", action="store_true", help="ignore and remove an earlier run's outputs in --out")
    run.add_argument(
        "--repetitions", type=int, default=1,
        help="run the experiment N times with seeds --seed..--seed+N-1 (fresh adapter each, same sites), each in "
        "--out/seed-S; then summary.csv, summary.json and plot.png over them in --out",
    )  # fmt: skip
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
    run.add_argument(
        "--dashboard", default="", metavar="[HOST:]PORT",
        help="serve the live dashboard; a bare port binds 127.0.0.1; off when empty",
    )
    serving = parser.add_argument_group("serving", "a federation that runs what is submitted to it (see above)")
    serving.add_argument("--serve", action="store_true", help="keep the federation and serve submitted runs")
    serving.add_argument("--state-dir", type=Path, default=Path("phalanx-state"), help="runs, rows, checkpoints and logs")
    serving.add_argument("--http", default="", help="serve JSON status on HOST:PORT (port 0: a free port); off if empty")
    serving.add_argument("--max-runs", type=int, default=4, help="runs executed at once; later ones wait, pending")
    add_run_arguments(parser)
    add_common_arguments(parser)
    return parser


def dashboard_address(value: str) -> str:
    """--dashboard as HOST:PORT: a bare port binds 127.0.0.1. AddressError (a ValueError) if malformed."""
    address = f"127.0.0.1:{value}" if value.isdigit() else value
    check_address(address, listening=True)
    return address


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
        (args.repetitions >= 1, "--repetitions must be at least 1"),
        (args.repetitions == 1 or not args.serve, "--repetitions is for a one-shot run; submit one run per seed to --serve"),
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
        if args.dashboard:
            args.dashboard = dashboard_address(args.dashboard)
            check_plaintext(args.dashboard, tls, args.insecure or args.spawn_trainers > 0, listening=True)
        for address in (args.listen, args.http, args.dashboard):
            if address:
                check_port_free(address)  # now, not after minutes of loading, and before --out is touched
    except ValueError as exc:  # TlsError, an address that is not host:port, or one in use
        parser.error(str(exc))


def clear_outputs(out: Path) -> None:
    names = ["metrics.jsonl", "checkpoints", "adapter", "logs", "pki", "plot.png", "summary.json", "summary.csv"]
    for path in [*(out / name for name in names), *out.glob("seed-*")]:
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


@dataclass
class PreparedRun:
    """One run of the command, ready to execute: its settings, outputs, model and where it starts."""

    seed: int
    config: CoordinatorConfig
    outputs: RunOutputs
    model: Any
    adapter: dict[str, Any]
    run_id: str
    start_round: int = 1
    resumed: dict[str, str] | None = None
    earlier_rows: list[dict[str, Any]] = field(default_factory=list)
    """The rows of the rounds run before a resume."""


async def prepare_run(config: CoordinatorConfig, seed: int, out: Path, report: Report) -> PreparedRun:
    """Build the model for `seed`, and resume from the checkpoint in `out` if there is one."""
    from phalanx.model import adapter_state, build_model

    config = replace(config, rounds=replace(config.rounds, seed=seed), model=replace(config.model, seed=seed), out=out)
    outputs = RunOutputs(out)
    model = await asyncio.to_thread(build_model, config.model)
    prepared = PreparedRun(seed, config, outputs, model, adapter_state(model), uuid.uuid4().hex)
    checkpoint = await asyncio.to_thread(outputs.load_latest_checkpoint)
    if checkpoint is None:
        outputs.truncate_metrics(-1)
        return prepared
    outputs.truncate_metrics(checkpoint.round)
    prepared.run_id = checkpoint.metadata.get("run_id", prepared.run_id)
    prepared.start_round, prepared.adapter, prepared.resumed = checkpoint.round + 1, checkpoint.adapter, checkpoint.metadata
    prepared.earlier_rows = outputs.read_metrics()
    report.say(f"Resuming after round {checkpoint.round} from the checkpoint in {out} (--fresh starts over).")
    return prepared


async def coordinate(args: argparse.Namespace, tls: TlsCredentials | None) -> int:
    """Run the federation's rounds (--repetitions times, one seed each), then write the outputs."""
    from coordinator.app import CoordinatorApp
    from coordinator.dashboard import Dashboard, LocalRuns, dashboard_access
    from coordinator.plots import plot_run
    from coordinator.repetitions import Repetition, finished_seeds, seed_folder
    from coordinator.run import RoundFailed
    from phalanx.model import save_adapter
    from phalanx.sites import load_source, split_holdout
    from phalanx.telemetry import Telemetry

    report = Report(args.rounds)
    labels = label_names(args) or (await asyncio.to_thread(load_source, data_config(args))).label_names
    if args.holdout_rows:
        await asyncio.to_thread(split_holdout, data_config(args))  # a DataError now, not in every spawned site
    if args.fresh:
        clear_outputs(args.out)
    series = args.repetitions > 1
    seeds = [args.seed + k for k in range(args.repetitions)]
    earlier = finished_seeds(args.out) if series else {}
    repetitions = [
        Repetition(seed, run["run_id"], RunOutputs(args.out / seed_folder(seed)).read_metrics(), run["stop_reason"], run["seconds"])
        for seed, run in earlier.items()
        if seed in seeds
    ]
    pending = [seed for seed in seeds if seed not in earlier]
    if series:
        report.say(
            f"{len(seeds)} repetitions, seeds {seeds[0]}..{seeds[-1]}, each in {args.out}/{seed_folder(seeds[0])} and so on"
            + (f"; {len(repetitions)} finished earlier." if repetitions else ".")
        )
    if not pending:
        await asyncio.to_thread(finish_series, args.out, repetitions, report)
        return 0
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
    folder = (lambda seed: args.out / seed_folder(seed)) if series else (lambda seed: args.out)
    prepared = await prepare_run(config, pending[0], folder(pending[0]), report)
    report.say(
        f"Labels {list(labels)}; adapter of {len(prepared.adapter)} tensors, "
        f"{sum(a.size for a in prepared.adapter.values()):,} parameters."
    )

    telemetry = Telemetry.create("phalanx-coordinator")
    app = CoordinatorApp(
        prepared.config, telemetry, prepared.outputs, prepared.adapter, run_id=prepared.run_id,
        start_round=prepared.start_round, on_round=report.round_done, resumed=prepared.resumed, series=series,
    )  # fmt: skip
    local_runs = LocalRuns(app.registry)  # each run of the series as it starts, for the dashboard
    dashboard: Dashboard | None = None
    if args.dashboard:
        dashboard = Dashboard(local_runs, *dashboard_access(tls, args.dashboard))
    spawned: TrainerProcesses | None = None
    stopped_by: list[str] = []
    execution: asyncio.Future[Any] | None = None
    exit_code = 1
    try:
        loop = asyncio.get_running_loop()

        def stop(sig: signal.Signals) -> None:
            """First signal: stop serving new work, let the round finish within the grace period. Second: stop now."""
            stopped_by.append(sig.name)
            if execution is None:
                return
            if len(stopped_by) > 1 or app.waiting_for_trainers:
                execution.cancel()
                return
            report.say(f"{sig.name}: finishing the round in flight (at most {args.shutdown_grace:.0f} s), then stopping.")
            app.stop_after_round()
            loop.call_later(args.shutdown_grace, execution.cancel)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig)
        address = await app.start()
        report.say(f"Coordinator listening on {address}; waiting for {max(args.min_trainers, args.spawn_trainers)} trainers.")
        if dashboard is not None:
            report.say(f"Dashboard at {await dashboard.start(args.dashboard)}/")
        for index, seed in enumerate(pending):
            if index:
                prepared = await prepare_run(config, seed, folder(seed), report)
                app.next_run(
                    prepared.config.run, prepared.outputs, prepared.adapter, run_id=prepared.run_id,
                    start_round=prepared.start_round, on_round=report.round_done, resumed=prepared.resumed,
                )  # fmt: skip
            app.run.replay(prepared.earlier_rows)
            if series:
                report.say(f"Repetition {seeds.index(seed) + 1} of {len(seeds)}: seed {seed}, outputs in {prepared.outputs.out}.")
            report.watch(app.run.progress)
            local_runs.add(app.run, prepared.outputs)
            started = time.perf_counter()
            execution = asyncio.ensure_future(app.execute())
            if stopped_by:
                execution.cancel()
            if args.spawn_trainers and spawned is None:
                spawned = await spawn_trainers(args, address, args.out / "logs", spawn_pki)
                report.say(
                    f"Started {args.spawn_trainers} trainers ({spawned.threads} torch threads each, --device {args.device}, "
                    f"--precision {args.precision}); logs in {args.out / 'logs'}."
                )
                early_exit = asyncio.ensure_future(spawned.first_exit())
                done, _ = await asyncio.wait({execution, early_exit}, return_when=asyncio.FIRST_COMPLETED)
                if execution not in done and app.waiting_for_trainers:
                    execution.cancel()
                    raise RuntimeError(early_exit.result())
                early_exit.cancel()
            await execution
            if stopped_by:
                raise asyncio.CancelledError
            run, outputs = app.run, prepared.outputs
            await asyncio.to_thread(
                save_adapter, prepared.model, run.adapter, outputs.adapter_dir, model_name=args.model, label_names=labels
            )
            rows = await asyncio.to_thread(outputs.read_metrics)
            await asyncio.to_thread(plot_run, rows, outputs.out / "plot.png", f"run {run.run_id} (seed {seed})")
            report.summary(
                rows, str(outputs.out), time.perf_counter() - started, run.stop_reason, logs=spawned is not None and not series,
                first_round=run.start_round,
            )  # fmt: skip
            if series:
                repetitions.append(Repetition(seed, run.run_id, rows, run.stop_reason, time.perf_counter() - started))
                await asyncio.to_thread(finish_series, args.out, repetitions, report, final=index == len(pending) - 1)
        exit_code = 0
    except asyncio.CancelledError:
        if not stopped_by:
            raise
        run = app.run
        if run.completed_rounds > 0:
            await asyncio.to_thread(
                save_adapter, prepared.model, run.completed_adapter, prepared.outputs.adapter_dir, model_name=args.model,
                label_names=labels,
            )  # fmt: skip
        report.say(f"Stopped by {stopped_by[0]} {stopped_after(run)}; run again with the same --out to resume.")
        exit_code = 0 if stopped_by[0] == "SIGTERM" else 130
    except RoundFailed as exc:
        report.say(f"Run failed: {exc}")
    except TimeoutError:
        report.say(f"Run failed: fewer than {args.min_trainers} trainers registered within {args.register_timeout:.0f} s.")
    except RuntimeError as exc:
        report.say(f"Run failed: {exc}")
    finally:
        report.close()
        if dashboard is not None:
            await dashboard.close()
        await app.close("finished" if exit_code == 0 and not stopped_by else "the coordinator stopped")
        if spawned is not None:
            await spawned.stop()
        telemetry.shutdown()
    return exit_code


def stopped_after(run: Any) -> str:
    """Where an interrupted run stands, for the line that says it stopped."""
    if run.rounds_here == 0:
        return "before any round completed" + (f" since the resume after round {run.completed_rounds}" if run.start_round > 1 else "")
    saved = f" (adapter/ holds round {run.completed_rounds}'s adapter)" if run.completed_rounds > 0 else ""
    return f"after round {run.completed_rounds}{saved}"


def finish_series(out: Path, repetitions: list[Any], report: Report, final: bool = True) -> None:
    """Write summary.json, summary.csv and the band plot of the repetitions so far; at the end, say what they show."""
    from coordinator.plots import plot_repetitions
    from coordinator.repetitions import seed_folder, summarise, write_summary

    repetitions = sorted(repetitions, key=lambda rep: rep.seed)
    summary = summarise(repetitions)
    write_summary(out, summary)
    plot_repetitions(summary, out / "plot.png", f"{len(repetitions)} repetitions, seeds {[r.seed for r in repetitions]}")
    if not final:
        return
    accuracy, loss = summary["final"]["accuracy"], summary["final"]["loss"]
    if accuracy["mean"] is not None:
        spread = f" ± {accuracy['std']:.3f} (sd)" if accuracy["std"] is not None else ""
        report.say(
            f"\n{len(repetitions)} repetitions: final accuracy {accuracy['mean']:.3f}{spread}, "
            f"min {accuracy['min']:.3f}, max {accuracy['max']:.3f}; final loss {loss['mean']:.4f}"
        )
    folders = ", ".join(f"{seed_folder(r.seed)}/" for r in repetitions)
    report.say(f"  outputs in {out}: summary.csv, summary.json, plot.png, {folders}")


async def serve(args: argparse.Namespace, tls: TlsCredentials | None) -> int:
    """Serve the federation and its runs until SIGINT or SIGTERM; the runs in flight resume at the next start."""
    from coordinator.admin import AdminAccess, RunServicer
    from coordinator.dashboard import Dashboard, ServedRuns, dashboard_access
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
    dashboard = Dashboard(ServedRuns(coordinator), *dashboard_access(tls, args.dashboard)) if args.dashboard else None
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
        if dashboard is not None:
            print(f"Dashboard at {await dashboard.start(args.dashboard)}/", flush=True)
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
        if dashboard is not None:
            await dashboard.close()
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
    except KeyboardInterrupt:  # before the run's own handlers were in place: nothing had started
        print("Interrupted while loading; nothing was run.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
