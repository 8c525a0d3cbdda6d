"""python -m coordinator: run a Phalanx federation.

Trainers register with this process; it runs --rounds federated rounds over them and writes
metrics.jsonl, checkpoints/ and the final PEFT adapter/ into --out. With --spawn-trainers N it
also starts N local trainers on partitions 0..N-1 of --data, so one command runs a whole
federation. A run whose --out holds a checkpoint resumes after its last completed round.
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
    configure_logging,
    data_config,
    label_names,
    model_and_data_flags,
    model_config,
    parse_with_config,
    tls_credentials,
)
from coordinator.aggregation import AGGREGATORS
from coordinator.config import CoordinatorConfig, RoundConfig
from coordinator.registry import RegistryLimits
from phalanx.codec import DEFAULT_MAX_ADAPTER_BYTES, WIRE_DTYPES
from phalanx.privacy import ACCOUNTANTS
from phalanx.rpc import TlsCredentials, check_plaintext

log = logging.getLogger("coordinator")


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
    rounds = parser.add_argument_group("rounds")
    rounds.add_argument("--rounds", type=int, default=8, help="federated rounds")
    rounds.add_argument("--min-trainers", type=int, default=2, help="trainers needed to start and to accept a round")
    rounds.add_argument("--fraction-train", type=float, default=1.0, help="share of live trainers sampled per round")
    rounds.add_argument("--fraction-evaluate", type=float, default=1.0, help="share of live trainers that evaluate")
    rounds.add_argument("--local-steps", type=int, default=15, help="optimizer steps per trainer per round")
    rounds.add_argument("--batch-size", type=int, default=32, help="training batch size")
    rounds.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    rounds.add_argument("--eval-max-examples", type=int, default=400, help="test examples per trainer (0: all)")
    rounds.add_argument("--round-timeout", type=float, default=300.0, help="seconds a trainer has to answer a call")
    rounds.add_argument("--round-retries", type=int, default=0, help="times a failed round is tried again")
    rounds.add_argument("--aggregator", choices=AGGREGATORS, default="fedavg", help="aggregation strategy")
    rounds.add_argument("--trim", type=float, default=0.2, help="share cut at each end per coordinate by trimmed-mean")
    rounds.add_argument("--clip-norm", type=float, default=0.0, help="clip each update's L2 norm to this (0: off)")
    rounds.add_argument(
        "--deterministic", action="store_true", help="fold replies in a fixed order: bit-identical reruns, more memory"
    )
    rounds.add_argument("--wire-dtype", choices=sorted(WIRE_DTYPES), default="float32", help="adapter dtype on the wire")
    privacy = parser.add_argument_group(
        "differential privacy", "site-level DP-FedAvg: updates clipped to --clip-norm, uniform weights, Gaussian noise"
    )
    privacy.add_argument(
        "--dp-noise-multiplier", type=float, default=0.0, help="noise std over --clip-norm on the sum of updates (0: off)"
    )
    privacy.add_argument("--dp-delta", type=float, default=1e-5, help="δ of the (ε, δ) guarantee reported")
    privacy.add_argument(
        "--dp-target-epsilon", type=float, default=0.0,
        help="budget: stop before a round that would pass it; without --dp-noise-multiplier, calibrate the noise to it",
    )  # fmt: skip
    secure = parser.add_argument_group(
        "secure aggregation", "SecAgg+: sites mask their updates so the coordinator learns only the weighted sum"
    )
    secure.add_argument("--secure-aggregation", action="store_true", help="mask every round's training replies")
    secure.add_argument(
        "--secagg-neighbours", type=int, default=0, help="neighbours per site (k, even unless all); 0: from the sites sampled"
    )
    secure.add_argument("--secagg-threshold", type=int, default=0, help="shares that recover a secret (t > k/2); 0: ⌈2k/3⌉")
    secure.add_argument(
        "--secagg-range", type=float, default=0.0,
        help="clip each update coordinate to ±this before quantising; 0: --clip-norm plus the noise's tail, or 1",
    )  # fmt: skip
    privacy.add_argument(
        "--dp-accountant", choices=ACCOUNTANTS, default="rdp",
        help="RDP, or PLD (tighter; needs --fraction-train 1: it has no event for sampling without replacement)",
    )  # fmt: skip
    privacy.add_argument(
        "--dp-adaptive-clipping", action="store_true",
        help="start at --clip-norm and move it each round towards --dp-target-quantile of the update norms",
    )  # fmt: skip
    privacy.add_argument("--dp-target-quantile", type=float, default=0.5, help="share of updates adaptive clipping leaves unclipped")
    privacy.add_argument("--dp-clip-lr", type=float, default=0.2, help="adaptive clipping's geometric step size")
    privacy.add_argument(
        "--dp-clipped-count-stddev", type=float, default=0.0, help="noise on the count of unclipped updates; 0: max(m/20, z)"
    )
    add_common_arguments(parser)
    return parser


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace, tls: TlsCredentials | None) -> None:
    checks = [
        (args.rounds >= 1, "--rounds must be at least 1"),
        (args.min_trainers >= 1, "--min-trainers must be at least 1"),
        (0 < args.fraction_train <= 1, "--fraction-train must be in (0, 1]"),
        (0 < args.fraction_evaluate <= 1, "--fraction-evaluate must be in (0, 1]"),
        (args.local_steps >= 1, "--local-steps must be at least 1"),
        (args.round_timeout > 0, "--round-timeout must be positive"),
        (args.max_transfers >= 1, "--max-transfers must be at least 1"),
        (args.round_retries >= 0, "--round-retries cannot be negative"),
        (0 <= args.trim < 0.5, "--trim must be in [0, 0.5)"),
        (args.clip_norm >= 0, "--clip-norm cannot be negative"),
        (args.shutdown_grace >= 0, "--shutdown-grace cannot be negative"),
        (args.spawn_trainers >= 0, "--spawn-trainers cannot be negative"),
        (
            args.spawn_trainers == 0 or args.spawn_trainers >= args.min_trainers,
            "--spawn-trainers must be at least --min-trainers",
        ),
        (args.max_trainers >= 1, "--max-trainers must be at least 1"),
        (
            args.spawn_trainers == 0 or not any([args.ca, args.cert, args.key]),
            "--spawn-trainers provisions its own throwaway CA under --out; drop --ca/--cert/--key",
        ),
        (args.dp_noise_multiplier >= 0 and args.dp_target_epsilon >= 0, "DP settings cannot be negative"),
        (0 < args.dp_delta < 1, "--dp-delta must be in (0, 1)"),
    ]
    if args.dp_noise_multiplier > 0 or args.dp_target_epsilon > 0:
        checks += [
            (args.clip_norm > 0, "differential privacy needs --clip-norm C, the bound on each site's update"),
            (args.aggregator == "fedavg", "differential privacy works with --aggregator fedavg only"),
            (not args.deterministic, "--deterministic cannot reproduce DP noise, which is drawn fresh every round"),
            (0 < args.dp_target_quantile < 1, "--dp-target-quantile must be in (0, 1)"),
            (
                args.dp_accountant == "rdp" or args.fraction_train == 1,
                "--dp-accountant pld needs --fraction-train 1: it cannot account sampling without replacement",
            ),
            (args.dp_clip_lr > 0 and args.dp_clipped_count_stddev >= 0, "--dp-clip-lr must be positive, the count noise not negative"),
        ]
    elif args.dp_adaptive_clipping:
        checks.append((False, "--dp-adaptive-clipping needs differential privacy (--dp-noise-multiplier or --dp-target-epsilon)"))
    if args.secure_aggregation:
        checks += [
            (
                args.aggregator == "fedavg",
                f"--aggregator {args.aggregator} needs each site's update; secure aggregation gives only their sum",
            ),
            (
                tls is not None or (args.spawn_trainers > 0 and not args.insecure),
                "secure aggregation needs certificates (--ca/--cert/--key, or --spawn-trainers without --insecure): "
                "sites sign their keys with them",
            ),
            (args.secagg_neighbours >= 0 and args.secagg_threshold >= 0, "--secagg-neighbours/-threshold cannot be negative"),
            (args.secagg_range >= 0, "--secagg-range cannot be negative"),
        ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    try:
        # --spawn-trainers provisions its own certificates unless --insecure: either way plaintext is chosen or avoided.
        check_plaintext(args.listen, tls, args.insecure or args.spawn_trainers > 0, listening=True)
    except ValueError as exc:  # TlsError, or an address that is not host:port
        parser.error(str(exc))


def round_config(args: argparse.Namespace) -> RoundConfig:
    return RoundConfig(
        rounds=args.rounds,
        min_trainers=args.min_trainers,
        fraction_train=args.fraction_train,
        fraction_evaluate=args.fraction_evaluate,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        eval_max_examples=args.eval_max_examples,
        round_timeout=args.round_timeout,
        aggregator=args.aggregator,
        trim=args.trim,
        clip_norm=args.clip_norm,
        deterministic=args.deterministic,
        round_retries=args.round_retries,
        wire_dtype=args.wire_dtype,
        seed=args.seed,
        dp_noise_multiplier=args.dp_noise_multiplier,
        dp_delta=args.dp_delta,
        dp_target_epsilon=args.dp_target_epsilon,
        dp_accountant=args.dp_accountant,
        dp_adaptive_clipping=args.dp_adaptive_clipping,
        dp_target_quantile=args.dp_target_quantile,
        dp_clip_lr=args.dp_clip_lr,
        dp_clipped_count_stddev=args.dp_clipped_count_stddev,
        secure_aggregation=args.secure_aggregation,
        secagg_neighbours=args.secagg_neighbours,
        secagg_threshold=args.secagg_threshold,
        secagg_range=args.secagg_range,
    )


def clear_outputs(out: Path) -> None:
    for name in ("metrics.jsonl", "checkpoints", "adapter", "logs", "pki"):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


async def coordinate(args: argparse.Namespace, tls: TlsCredentials | None) -> int:
    from coordinator.app import CoordinatorApp
    from coordinator.federation import RoundFailed
    from coordinator.outputs import RunOutputs
    from coordinator.report import Report
    from coordinator.spawn import TrainerProcesses, provision_spawned
    from phalanx.model import adapter_state, build_model, save_adapter
    from phalanx.sites import load_source
    from phalanx.telemetry import Telemetry

    started = time.perf_counter()
    report = Report(args.rounds)
    labels = label_names(args) or (await asyncio.to_thread(load_source, data_config(args))).label_names
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
        run = asyncio.ensure_future(app.run())
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
            threads = args.trainer_threads or max(1, (os.cpu_count() or 1) // args.spawn_trainers)
            spawned = TrainerProcesses(
                args.spawn_trainers, address, model_and_data_flags(args), args.out / "logs", threads, spawn_pki
            )
            await spawned.start()
            report.say(f"Started {args.spawn_trainers} trainers ({threads} torch threads each); logs in {args.out / 'logs'}.")
            early_exit = asyncio.ensure_future(spawned.first_exit())
            done, _ = await asyncio.wait({run, early_exit}, return_when=asyncio.FIRST_COMPLETED)
            if run not in done and app.waiting_for_trainers:
                run.cancel()
                raise RuntimeError(early_exit.result())
            early_exit.cancel()
        await run
        if stopped_by:
            raise asyncio.CancelledError
        await asyncio.to_thread(save_adapter, model, app.federation.adapter, outputs.adapter_dir)
        report.summary(outputs.read_metrics(), str(args.out), time.perf_counter() - started, app.federation.stop_reason)
        exit_code = 0
    except asyncio.CancelledError:
        if not stopped_by:
            raise
        done = app.federation.completed_rounds
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_with_config(parser, argv)
    tls = tls_credentials(parser, args)
    validate(parser, args, tls)
    configure_logging(args.log_level, "coordinator")
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
