"""Coordinator cost per round against echo trainers on loopback: `python -m bench.round_overhead [--quick]`.

The real coordinator (`CoordinatorApp`, recording spans and metrics but exporting nothing, as it
does by default) runs in this process; N echo trainers (`python -m trainer.echo`: the real node
and servicer, with local work that returns the adapter unchanged) run in one child process. The
two share this machine's cores, so a round's wall time also holds the trainers' decoding and
encoding; the CPU columns split the cost between the two processes.

Every case runs twice, side by side: in plaintext, then with mutual TLS (`--tls both`, the
default; `off` or `on` runs one of the two). For an mTLS case a throwaway CA signs a certificate
for the coordinator and one per echo trainer (EC P-256, in the case's temporary folder); the
coordinator requires the trainers' certificates and presents its own on its channels to them,
and each trainer does the same. Every channel's handshake happens when its trainer registers,
before round 0, so the measured rounds hold what TLS costs on every round: encrypting and
decrypting each message in both processes. `x plain` is an mTLS case's median round over the
plaintext case's, measured just before it. A site lost to connection set-up shows as a FAILED
case: every trainer must register and answer every round.

Per case, over the rounds after the warm-up:
- round ms: the rows' `seconds` (train plus evaluate phase), median and p90, and each phase's
  median; `period` is the median wall time from one round's row to the next, which also holds
  the checkpoint written between rounds and the metrics line;
- CPU ms per round of this process (all its threads, and its event-loop thread alone, which runs
  the coordinator's and grpc.aio's Python code) and of the trainers' process;
- floor: the median round of `bench.grpc_floor`, measured right after the case with the same N
  and P: the same calls with the same number and size of messages in bare grpc.aio, with nothing
  of Phalanx in them, over mutual TLS for an mTLS case (the same CA set-up and handshakes), so
  `x floor` (the case's median over it) compares like with like. A goal below the floor is
  marked: no code that makes these calls over grpc.aio can meet it on this machine;
- bytes: protobuf bytes per trainer (the rows' `bytes_sent` and `bytes_received`) over the
  adapter's raw float32 bytes, per round and per adapter transfer: each round sends the adapter
  twice (Train and Evaluate requests) and receives it once (the Train reply). `overhead` is the
  larger transfer over the raw bytes in the wire dtype; `encoded` is the same ratio computed from
  the request messages `encode` makes, without a run.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib.metadata
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
from opentelemetry.sdk.trace.export import SpanExporter

from bench import grpc_floor
from bench.common import DEFAULT_PARAMS, header
from coordinator.app import CoordinatorApp
from coordinator.config import CoordinatorConfig, RoundConfig
from coordinator.run import RoundFailed
from coordinator.outputs import RunOutputs
from phalanx.codec import WIRE_DTYPES, encode
from phalanx.pki import COORDINATOR_NAME, provision
from phalanx.rpc import TlsCredentials
from phalanx.telemetry import Telemetry
from phalanx.v1 import trainer_pb2
from trainer.echo import echo_name, synthetic_adapter

REPO = Path(__file__).resolve().parents[1]
LABELS = ("negative", "neutral", "positive")
TRAINERS = (2, 8, 32, 128)
PARAMS = (DEFAULT_PARAMS, 1_200_000)
HALF_WIRES = ("bfloat16", "float16")
GOAL_MS = {8: 10.0, 128: 50.0}
"""Median round milliseconds to stay within, by trainer count, at DEFAULT_PARAMS on float32."""
MAX_BYTES_RATIO = 1.02
"""Protobuf bytes of one adapter transfer over its raw bytes in the wire dtype."""
WIRE_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
ROUND_TIMEOUT_SECONDS = 120.0
REGISTER_TIMEOUT_SECONDS = 120.0
TRAINER_GIVE_UP_SECONDS = 10.0
"""Echo trainers left behind by a killed benchmark exit once the coordinator is gone this long."""
STOP_GRACE_SECONDS = 10.0
TLS_MODES = {"both": (False, True), "off": (False,), "on": (True,)}
"""--tls: which of plaintext (False) and mutual TLS (True) each case runs with, in this order."""
COORDINATOR_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Case:
    trainers: int
    params: int
    wire: str = "float32"
    aggregator: str = "fedavg"
    max_transfers: int = CoordinatorConfig.max_transfers
    tls: bool = False
    """Mutual TLS on every channel (a throwaway CA per case)."""
    secure: bool = False
    """Secure aggregation (RoundConfig.secure_aggregation; needs tls)."""
    eval_examples: int = 0
    """Examples each trainer evaluates on (RoundConfig.eval_max_examples; 0: all)."""

    @property
    def name(self) -> str:
        security = "mtls" if self.tls else "plain"
        if self.secure:
            security += "-secagg"
        return (
            f"n{self.trainers}-p{self.params}-{self.wire}-{self.aggregator}-t{self.max_transfers}-{security}"
        )

    @property
    def security(self) -> str:
        """The tls column: off or mTLS."""
        return "mTLS" if self.tls else "off"


@dataclass(frozen=True)
class Mark:
    """Clocks read when a round's row is written."""

    wall: float
    cpu: float
    loop_cpu: float
    trainers_cpu: float


def versions() -> str:
    names = ("grpcio", "protobuf", "opentelemetry-sdk", "opentelemetry-instrumentation-grpc")
    return "# " + ", ".join(f"{name} {importlib.metadata.version(name)}" for name in names)


def start_trainers(
    address: str, count: int, params: int, certs: Path | None = None, profile: Path | None = None
) -> subprocess.Popen:
    """`count` echo trainers in one child process, with mutual TLS from the `certs` folder if given,
    optionally under cProfile (written when they exit)."""
    runner = ["-m", "cProfile", "-o", str(profile)] if profile else []
    tls = ["--certs", str(certs)] if certs else []
    argv = [
        sys.executable, *runner, "-m", "trainer.echo", "--coordinator", address, "--count", str(count),
        "--params", str(params), "--give-up-after", str(TRAINER_GIVE_UP_SECONDS), *tls,
    ]  # fmt: skip
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL)


def stop_process(process: subprocess.Popen) -> None:
    """Give `process` STOP_GRACE_SECONDS to exit by itself, as long again after SIGTERM, then kill it."""
    for send in (None, process.terminate, process.kill):
        if send is not None:
            send()
        try:
            process.wait(STOP_GRACE_SECONDS)
            return
        except subprocess.TimeoutExpired:
            pass


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def provision_pki(folder: Path, trainers: int) -> TlsCredentials:
    """A throwaway CA in `folder` with certificates for the coordinator and echo trainers 0 to
    `trainers` - 1; returns the coordinator's credentials."""
    provision(folder, [echo_name(k) for k in range(trainers)], COORDINATOR_HOSTS)
    return TlsCredentials.load(
        folder / "ca.pem", folder / f"{COORDINATOR_NAME}.pem", folder / f"{COORDINATOR_NAME}.key"
    )


def create_coordinator(
    case: Case,
    rounds: int,
    out: Path,
    on_round: Callable[[dict[str, Any]], None],
    tls: TlsCredentials | None = None,
    spans: SpanExporter | None = None,
) -> tuple[CoordinatorApp, Telemetry]:
    """The coordinator of one case, recording telemetry without exporting it (the default), or
    handing its finished spans to `spans`.

    Every trainer is sampled and must answer: one missing reply fails the round and the benchmark.
    """
    config = CoordinatorConfig(
        rounds=RoundConfig(
            rounds=rounds,
            min_trainers=case.trainers,
            local_steps=1,
            round_timeout=ROUND_TIMEOUT_SECONDS,
            aggregator=case.aggregator,
            wire_dtype=case.wire,
            eval_max_examples=case.eval_examples,
            secure_aggregation=case.secure,
        ),
        label_names=LABELS,
        listen="127.0.0.1:0",
        out=out,
        start_with=case.trainers,
        register_timeout=REGISTER_TIMEOUT_SECONDS,
        max_transfers=case.max_transfers,
        tls=tls,
    )
    telemetry = Telemetry.create("phalanx-coordinator", span_exporter=spans)
    app = CoordinatorApp(config, telemetry, RunOutputs(out), synthetic_adapter(case.params), run_id="bench", on_round=on_round)
    return app, telemetry


async def run_or_fail(app: CoordinatorApp, trainers: int) -> list[dict[str, Any]]:
    """`app.execute()`, with trainers that never registered (e.g. lost to connection set-up) raised as
    RoundFailed, so the case prints as FAILED like a round with a missing reply."""
    try:
        return await app.execute()
    except TimeoutError:
        live = len(app.registry.live())
        raise RoundFailed(
            f"only {live} of {trainers} trainers registered within {REGISTER_TIMEOUT_SECONDS:g} s"
        ) from None


async def run_case(
    case: Case, rounds: int, warmup: int, profile_dir: Path | None = None, spans: SpanExporter | None = None
) -> tuple[list[dict[str, Any]], list[Mark]]:
    """Run a coordinator and its echo trainers; return the rows and the clocks read at each row.

    With `profile_dir`, the coordinator's event loop is profiled over the rounds after the
    warm-up, and the trainers' process over its whole life. A TLS case provisions its PKI in the
    case's temporary folder first. The coordinator's finished spans go to `spans` if given.
    """
    trainers: subprocess.Popen | None = None
    trainers_process: psutil.Process | None = None
    profiler = cProfile.Profile()
    marks: list[Mark] = []

    def mark(row: dict[str, Any]) -> None:
        assert trainers_process is not None
        marks.append(
            Mark(time.perf_counter(), time.process_time(), time.thread_time(), cpu_seconds(trainers_process))
        )
        if profile_dir and row["round"] == warmup:
            profiler.enable()

    with tempfile.TemporaryDirectory(prefix="phalanx-bench-") as tmp:
        certs = Path(tmp) / "pki" if case.tls else None
        tls = provision_pki(certs, case.trainers) if certs else None
        app, telemetry = create_coordinator(case, rounds, Path(tmp), mark, tls, spans)
        try:
            address = await app.start()
            trainers = start_trainers(
                address,
                case.trainers,
                case.params,
                certs,
                profile_dir / f"trainers-{case.name}.pstats" if profile_dir else None,
            )
            trainers_process = psutil.Process(trainers.pid)
            rows = await run_or_fail(app, case.trainers)
        finally:
            profiler.disable()
            await app.close("finished")
            telemetry.shutdown()
            if trainers is not None:
                await asyncio.to_thread(stop_process, trainers)
    if profile_dir:
        profiler.dump_stats(profile_dir / f"coordinator-{case.name}.pstats")
    return rows, marks


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]


@dataclass(frozen=True)
class Figures:
    case: Case
    rounds: int
    round_ms: float
    round_p90_ms: float
    period_ms: float
    train_ms: float
    evaluate_ms: float
    cpu_ms: float
    loop_cpu_ms: float
    trainers_cpu_ms: float
    sent_ratio: float
    """Bytes sent per trainer and round over the raw float32 adapter."""
    received_ratio: float


def figures(case: Case, rows: list[dict[str, Any]], marks: list[Mark], warmup: int) -> Figures:
    """Figures over the rows after round 0 and `warmup` more (rows[i] was written at marks[i])."""
    first = 1 + warmup
    measured = rows[first:]
    if not measured:
        raise ValueError(f"{len(rows) - 1} rounds leave none to measure after {warmup} warm-up rounds")
    ms = [1e3 * r["seconds"] for r in measured]
    periods = [marks[i].wall - marks[i - 1].wall for i in range(first, len(marks))]
    count = len(measured)
    raw = rows[0]["adapter_bytes"]
    return Figures(
        case=case,
        rounds=count,
        round_ms=statistics.median(ms),
        round_p90_ms=p90(ms),
        period_ms=1e3 * statistics.median(periods),
        train_ms=1e3 * statistics.median(r["train_seconds"] for r in measured),
        evaluate_ms=1e3 * statistics.median(r["evaluate_seconds"] for r in measured),
        cpu_ms=1e3 * (marks[-1].cpu - marks[first - 1].cpu) / count,
        loop_cpu_ms=1e3 * (marks[-1].loop_cpu - marks[first - 1].loop_cpu) / count,
        trainers_cpu_ms=1e3 * (marks[-1].trainers_cpu - marks[first - 1].trainers_cpu) / count,
        sent_ratio=sum(r["bytes_sent"] for r in measured) / (count * case.trainers * raw),
        received_ratio=sum(r["bytes_received"] for r in measured) / (count * case.trainers * raw),
    )


def goal(f: Figures, floor_ms: float) -> str:
    limit = GOAL_MS.get(f.case.trainers)
    if limit is None or f.case.params != DEFAULT_PARAMS or f.case.wire != "float32":
        return ""
    verdict = f"<= {limit:g} ms: {'met' if f.round_ms <= limit else 'MISSED'}"
    return verdict + (" (below the floor)" if limit < floor_ms else "")


def case_columns(case: Case) -> str:
    """The columns that name a case in both tables: N, P, wire and tls."""
    return f"{case.trainers:>4} {case.params:>10,} {case.wire:>8} {case.security:>4}"


CASE_HEADER = f"{'N':>4} {'P':>10} {'wire':>8} {'tls':>4}"
TIME_HEADER = (
    f"{CASE_HEADER} {'rounds':>6} {'median':>8} {'p90':>8} {'period':>8} {'train':>8} {'evaluate':>8} "
    f"{'CPU coord':>9} {'loop':>7} {'trainers':>9} {'floor':>7} {'x floor':>7} {'x plain':>7}  goal"
)


def time_line(f: Figures, floor_ms: float, plain_ms: float | None) -> str:
    """One row of the time table; `plain_ms` is the plaintext case's median round, for an mTLS case."""
    c = f.case
    x_plain = f"{f.round_ms / plain_ms:>7.2f}" if plain_ms else f"{'':>7}"
    return (
        f"{case_columns(c)} {f.rounds:>6} {f.round_ms:>8.1f} {f.round_p90_ms:>8.1f} {f.period_ms:>8.1f} "
        f"{f.train_ms:>8.1f} {f.evaluate_ms:>8.1f} {f.cpu_ms:>9.1f} {f.loop_cpu_ms:>7.1f} "
        f"{f.trainers_cpu_ms:>9.1f} {floor_ms:>7.1f} {f.round_ms / floor_ms:>7.2f} {x_plain}  "
        f"{goal(f, floor_ms)}"
    )


def encoded_ratio(params: int, wire: str) -> float:
    """Protobuf bytes of one Train request stream (header, then chunks) over the adapter's raw bytes in `wire`."""
    encoded = encode(synthetic_adapter(params), WIRE_DTYPES[wire])
    messages = [
        trainer_pb2.TrainRequest(header=trainer_pb2.TrainHeader(run_id="bench", adapter=encoded.manifest))
    ]
    messages += [trainer_pb2.TrainRequest(chunk=c) for c in encoded.chunks]
    return sum(m.ByteSize() for m in messages) / encoded.manifest.total_bytes


BYTES_HEADER = (
    f"{CASE_HEADER} {'sent/round':>10} {'/transfer':>9} {'recv/round':>10} {'/transfer':>9} "
    f"{'overhead':>9} {'encoded':>8}  goal"
)


def bytes_line(case: Case, f: Figures | None) -> str:
    """Measured ratios (none for a failed case) and the encoded one; the goal is judged on the worse of the two."""
    encoded = encoded_ratio(case.params, case.wire)
    measured = "".join(f"{'-':>{w}} " for w in (10, 9, 10, 9, 9))
    overhead = encoded
    if f is not None:
        sent, received = f.sent_ratio / 2, f.received_ratio
        overhead = max(sent, received) * 4 / WIRE_ITEMSIZE[case.wire]
        measured = (
            f"{f.sent_ratio:>10.4f} {sent:>9.4f} {f.received_ratio:>10.4f} {received:>9.4f} {overhead:>9.4f} "
        )
    verdict = "met" if max(overhead, encoded) <= MAX_BYTES_RATIO else "MISSED"
    if f is None:
        verdict += " (encoded only)"
    return f"{case_columns(case)} {measured}{encoded:>8.4f}  <= {MAX_BYTES_RATIO}: {verdict}"


def cases(trainers: list[int], params: list[int], wire_trainers: int, tls: str) -> list[Case]:
    """Each case in plaintext and then with mutual TLS, or in the one of the two `tls` names."""
    float32 = [Case(n, p) for p in params for n in trainers]
    half = [Case(wire_trainers, p, wire) for p in params for wire in HALF_WIRES] if wire_trainers else []
    return [replace(case, tls=on) for case in float32 + half for on in TLS_MODES[tls]]


def int_list(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part]


async def bench(args: argparse.Namespace) -> None:
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    print(
        header("phalanx round overhead: coordinator in this process, echo trainers in a child, on loopback")
    )
    print(versions())
    print(
        f"# round, period, phases: median ms over the rounds after {args.warmup} warm-up; "
        "CPU: ms per round of each process (loop: the coordinator's event-loop thread); "
        "floor: the same calls in bare grpc.aio (bench.grpc_floor; over mTLS for an mTLS case), measured "
        "after each case; x plain: an mTLS case's median over the plaintext case's just before it"
    )
    print(TIME_HEADER, flush=True)
    results: list[tuple[Case, Figures | None]] = []
    plain_ms: dict[Case, float] = {}
    for case in cases(args.trainers, args.params, args.wire_trainers, args.tls):
        rounds = args.rounds_large if case.params >= 1_000_000 else args.rounds
        if case.wire != "float32":
            rounds = min(rounds, args.wire_rounds)
        try:
            rows, marks = await run_case(case, rounds, args.warmup, args.profile)
        except RoundFailed as exc:
            results.append((case, None))
            reason = str(exc).split("; ")[0]  # the first trainer's
            print(f"{case_columns(case)}  FAILED: {reason}", flush=True)
            continue
        measured = figures(case, rows, marks, args.warmup)
        results.append((case, measured))
        if not case.tls:
            plain_ms[case] = measured.round_ms
        floor = await grpc_floor.measure(case.trainers, case.params, measured.rounds, tls=case.tls)
        plain = plain_ms.get(replace(case, tls=False)) if case.tls else None
        print(time_line(measured, 1e3 * statistics.median(floor), plain), flush=True)
    print(
        "\n# protobuf bytes per trainer over the raw float32 adapter (bytes_sent, bytes_received); overhead,"
    )
    print("# encoded: one transfer over the raw bytes in the wire dtype, measured and computed from encode()")
    print(BYTES_HEADER)
    for case, f in results:
        print(bytes_line(case, f))
    if args.profile:
        print(f"\n# cProfile statistics in {args.profile}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and only N = 8 and 128")
    parser.add_argument(
        "--trainers", type=int_list, help="comma-separated trainer counts (default 2,8,32,128)"
    )
    parser.add_argument(
        "--params", type=int_list, help="comma-separated adapter sizes (default 74883,1200000)"
    )
    parser.add_argument("--rounds", type=int, help="rounds per case (default 20, quick 8)")
    parser.add_argument("--rounds-large", type=int, help="rounds per case with P >= 1M (default 10, quick 5)")
    parser.add_argument(
        "--warmup", type=int, help="rounds after round 0 left out of the figures (default 2, quick 1)"
    )
    parser.add_argument(
        "--wire-trainers", type=int, default=8, help="N for the bfloat16 and float16 cases (0: none)"
    )
    parser.add_argument(
        "--wire-rounds", type=int, default=5, help="most rounds for the bfloat16 and float16 cases"
    )
    parser.add_argument(
        "--tls",
        choices=TLS_MODES,
        default="both",
        help="plaintext (off), mutual TLS (on), or both side by side (default)",
    )
    parser.add_argument(
        "--profile", type=Path, help="write cProfile statistics of both processes to this folder"
    )
    args = parser.parse_args(argv)
    args.trainers = args.trainers or ([8, 128] if args.quick else list(TRAINERS))
    args.params = args.params or list(PARAMS)
    args.rounds = args.rounds or (8 if args.quick else 20)
    args.rounds_large = args.rounds_large or (5 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.wire_rounds = max(args.wire_rounds, args.warmup + 2)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(bench(args))
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, or SIGTERM (which cancels the run)
        sys.exit(130)


if __name__ == "__main__":
    main()
