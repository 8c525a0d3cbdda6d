"""`python -m coordinator submit|runs|stop|logs`: the command-line client of a serving coordinator's RunService.

    python -m coordinator submit RUN.toml [--coordinator HOST:PORT]   # prints the run id last
    python -m coordinator runs
    python -m coordinator stop RUN_ID
    python -m coordinator logs RUN_ID [--follow]

With TLS, pass an admin certificate: --ca ca.pem --cert admin.pem --key admin.key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from phalanx.cli import HelpFormatter, add_tls_arguments, tls_credentials
from phalanx.rpc import TlsCredentials, check_plaintext, create_channel
from phalanx.telemetry import Telemetry
from phalanx.v1 import run_pb2, run_pb2_grpc

COMMANDS = ("submit", "runs", "stop", "logs")
CALL_TIMEOUT_SECONDS = 30.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m coordinator", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--coordinator", default="127.0.0.1:50051", help="the serving coordinator's address HOST:PORT")
    add_tls_arguments(common)
    submit = commands.add_parser("submit", parents=[common], help="submit a run from a TOML file")
    submit.add_argument("config", type=Path, help="the run's TOML file (keys: the one-shot command's run options)")
    commands.add_parser("runs", parents=[common], help="list the runs")
    stop = commands.add_parser("stop", parents=[common], help="stop a pending or running run")
    stop.add_argument("run_id")
    logs = commands.add_parser("logs", parents=[common], help="print a run's rows and log lines")
    logs.add_argument("run_id")
    logs.add_argument("--follow", action="store_true", help="keep printing until the run finishes")
    return parser


def describe(run: run_pb2.RunInfo) -> str:
    state = run_pb2.RunStatus.Name(run.status).removeprefix("RUN_STATUS_").lower()
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.created))
    reason = f"  {run.reason}" if run.reason else ""
    return f"{run.id}  {state:<9}  {run.completed_rounds:>3}/{run.rounds:<3}  {created}{reason}"


def row_line(row: dict) -> str:
    def num(key: str, fmt: str) -> str:
        value = row.get(key)
        return format(value, fmt) if isinstance(value, int | float) else "-"

    return (
        f"round {row.get('round')}: {row.get('status')}  loss {num('loss', '.4f')}  accuracy {num('accuracy', '.4f')}  "
        f"trainers {row.get('trainers_accepted', 0)}/{row.get('trainers_sampled', 0)}  {num('seconds', '.1f')} s"
    )


async def call(args: argparse.Namespace, tls: TlsCredentials | None) -> int:
    telemetry = Telemetry.create("phalanx-admin")
    try:
        async with create_channel(args.coordinator, telemetry, tls) as channel:
            stub = run_pb2_grpc.RunServiceStub(channel)
            if args.command == "submit":
                reply = await stub.SubmitRun(
                    run_pb2.SubmitRunRequest(config_toml=args.config.read_text(encoding="utf-8")), timeout=CALL_TIMEOUT_SECONDS
                )
                print(f"submitted run of {reply.run.rounds} rounds; follow it with: python -m coordinator logs {reply.run.id} --follow")
                print(reply.run.id)
            elif args.command == "runs":
                reply = await stub.ListRuns(run_pb2.ListRunsRequest(), timeout=CALL_TIMEOUT_SECONDS)
                for run in reply.runs:
                    print(describe(run))
            elif args.command == "stop":
                reply = await stub.StopRun(run_pb2.StopRunRequest(run_id=args.run_id), timeout=CALL_TIMEOUT_SECONDS)
                print(describe(reply.run))
            else:
                async for event in stub.StreamRun(run_pb2.StreamRunRequest(run_id=args.run_id, follow=args.follow)):
                    kind = event.WhichOneof("event")
                    if kind == "row_json":
                        print(row_line(json.loads(event.row_json)), flush=True)
                    elif kind == "log_line":
                        print(event.log_line, flush=True)
                    else:
                        print(describe(event.run), flush=True)
    except grpc.aio.AioRpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        telemetry.shutdown()
    return 0


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tls = tls_credentials(parser, args)
    try:
        check_plaintext(args.coordinator, tls, args.insecure, listening=False)
    except ValueError as exc:
        parser.error(str(exc))
    if args.command == "submit" and not args.config.is_file():
        parser.error(f"no such file: {args.config}")
    return asyncio.run(call(args, tls))
