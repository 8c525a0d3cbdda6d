"""Secure aggregation against plain rounds, side by side, with echo sites: `python -m bench.secagg [--quick]`.

Each case runs twice, as `bench.round_overhead` runs it (the real `CoordinatorApp` in this
process, N echo trainers in one child process, on loopback, with mutual TLS from a throwaway CA):
first plain, then with `secure_aggregation=True` and nothing else changed. Secure aggregation
needs mutual TLS (sites sign their round keys with their certificate keys), so the plain case
runs over mTLS too. Every site is sampled and must answer every stage; a lost site or a failed
round prints the case as FAILED with its reason. Sites evaluate on EVAL_EXAMPLES examples.

A secure round trains in four stages, each an OpenTelemetry span under `fl.round` (the
coordinator's spans go to an in-memory exporter, in both cases): `keys` (AdvertiseKeys: each
site makes and signs its round keys; the coordinator checks every signature), `shares`
(ShareKeys: each site checks its neighbours' signed keys, Shamir-shares its two secrets and seals
the shares per neighbour), `masked_input` (column `masked`: Train with the sealed shares, as in a
plain round, then on the site's side quantisation and one mask stream per neighbour plus the
self mask, and on the coordinator's the sum of uint32 words) and `unmask` (Unmask: shares
revealed, self-mask seeds recovered and their streams subtracted). The evaluate phase is the
same as a plain round's. All N sites share one process (one interpreter lock) and this machine's
cores with the coordinator, so the site-side work that real sites do in parallel adds up over N
here; the trainers' CPU column shows it.

Per case, over the rounds after the warm-up:
- round ms: the median of the rows' `seconds` (train plus evaluate phase), plain (and its train
  phase) and secure, and `x plain`, the secure median over the plain one; the goal is at most
  GOAL_RATIO at GOAL_CASE (N = 100, P = DEFAULT_PARAMS);
- the secure round's stages: the median duration of each `fl.secagg.*` span, and of its
  evaluate phase;
- CPU ms per round of this process (all threads) and of the trainers' process, plain and secure;
- KB per site per round: the rows' `bytes_sent` plus `bytes_received` (protobuf bytes of every
  call: Train, Evaluate, and the secure stages' requests and replies) over N, plain and secure,
  and the secure round's extra.

`--profile DIR` writes cProfile statistics of both processes' main threads (`run_case`): the
sites' secure-aggregation steps run in worker threads and are not in them.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench.common import DEFAULT_PARAMS, header
from bench.round_overhead import Case, Figures, figures, int_list, run_case, versions
from coordinator.run import RoundFailed

TRAINERS = (10, 50, 100)
PARAMS = (DEFAULT_PARAMS, 1_200_000)
LARGE_PARAMS = 1_000_000
"""Cases with at least this many parameters run `--rounds-large` rounds."""
STAGES = ("keys", "shares", "masked_input", "unmask")
"""The secure round's spans, `fl.secagg.<stage>`, in the order they run."""
GOAL_CASE = (100, DEFAULT_PARAMS)
GOAL_RATIO = 3.0
"""A secure round's median over the plain one's, at GOAL_CASE (N, P)."""
EVAL_EXAMPLES = 1

TITLES = (
    f"{'N':>4} {'P':>10} {'rounds':>6} | {'plain':>7} {'train':>7} | {'secure':>7} {'x plain':>7} | "
    f"{'keys':>6} {'shares':>6} {'masked':>7} {'unmask':>6} {'eval':>6} | "
    f"{'CPU coord':>9} {'secure':>7} {'trainers':>8} {'secure':>7} | {'KB/site':>8} {'secure':>8} {'extra':>7}"
)


@dataclass(frozen=True)
class Measured:
    figures: Figures
    stage_ms: dict[str, float]
    """Median ms of each secure stage's span (empty for a plain case)."""
    kb_per_site: float
    """Protobuf KB sent and received per site and round."""


def stage_medians(spans: Sequence[ReadableSpan], first_round: int) -> dict[str, float]:
    """Median ms of each `fl.secagg.*` span, over the rounds from `first_round` on."""
    measured = {
        s.context.span_id
        for s in spans
        if s.name == "fl.round"
        and isinstance(r := (s.attributes or {}).get("fl.round"), int)
        and r >= first_round
    }
    durations: dict[str, list[float]] = {}
    for s in spans:
        if s.name.startswith("fl.secagg.") and s.parent is not None and s.parent.span_id in measured:
            assert s.start_time is not None and s.end_time is not None
            durations.setdefault(s.name.removeprefix("fl.secagg."), []).append(
                (s.end_time - s.start_time) / 1e6
            )
    return {stage: statistics.median(ms) for stage, ms in durations.items()}


async def measure(case: Case, rounds: int, warmup: int, profile_dir: Path | None) -> Measured:
    spans = InMemorySpanExporter()
    rows, marks = await run_case(case, rounds, warmup, profile_dir, spans)
    first = 1 + warmup  # round 0 only evaluates
    measured = rows[first:]
    traffic = sum(r["bytes_sent"] + r["bytes_received"] for r in measured)
    return Measured(
        figures(case, rows, marks, warmup),
        stage_medians(spans.get_finished_spans(), first),
        traffic / (1e3 * len(measured) * case.trainers),
    )


def line(case: Case, plain: Measured, secure: Measured) -> str:
    p, s = plain.figures, secure.figures
    stages = " ".join(
        f"{secure.stage_ms.get(stage, float('nan')):>{w}.1f}" for stage, w in zip(STAGES, (6, 6, 7, 6))
    )
    return (
        f"{case.trainers:>4} {case.params:>10,} {p.rounds:>6} | {p.round_ms:>7.1f} {p.train_ms:>7.1f} | {s.round_ms:>7.1f} "
        f"{s.round_ms / p.round_ms:>7.2f} | {stages} {s.evaluate_ms:>6.1f} | {p.cpu_ms:>9.1f} {s.cpu_ms:>7.1f} "
        f"{p.trainers_cpu_ms:>8.1f} {s.trainers_cpu_ms:>7.1f} | {plain.kb_per_site:>8.1f} "
        f"{secure.kb_per_site:>8.1f} {secure.kb_per_site - plain.kb_per_site:>+7.1f}"
    )


def goal(ratios: dict[tuple[int, int], float | None]) -> str:
    """The verdict on GOAL_RATIO at GOAL_CASE, if that case ran."""
    n, params = GOAL_CASE
    if GOAL_CASE not in ratios:
        return f"# goal (N = {n}, P = {params:,}) not in this run"
    ratio = ratios[GOAL_CASE]
    verdict = (
        "not measured (FAILED)"
        if ratio is None
        else f"x {ratio:.2f}: {'met' if ratio <= GOAL_RATIO else 'MISSED'}"
    )
    return (
        f"# goal: a secure round at most {GOAL_RATIO:g} x a plain one at N = {n}, P = {params:,}: {verdict}"
    )


async def bench(args: argparse.Namespace) -> None:
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    started = time.perf_counter()
    print(header("phalanx secure aggregation against plain rounds: mTLS, echo sites in a child, on loopback"))
    print(versions())
    print(
        f"# ms: medians over the rounds after {args.warmup} warm-up; train: the plain round's train phase; "
        "keys..unmask, eval: the secure round's "
        "stages (fl.secagg.* spans) and evaluate phase; CPU: ms per round of the coordinator's process "
        "and of the trainers'; KB/site: protobuf KB per site and round, extra: secure minus plain"
    )
    print(TITLES, flush=True)
    ratios: dict[tuple[int, int], float | None] = {}
    for params in args.params:
        for trainers in args.trainers:
            case = Case(trainers, params, tls=True, eval_examples=EVAL_EXAMPLES)
            rounds = args.rounds_large if params >= LARGE_PARAMS else args.rounds
            outcomes: list[Measured | str] = []
            for on in (False, True):
                try:
                    outcomes.append(
                        await measure(replace(case, secure=on), rounds, args.warmup, args.profile)
                    )
                except RoundFailed as exc:
                    outcomes.append(str(exc).split("; ")[0])  # the first site's reason
            plain, secure = outcomes
            if isinstance(plain, Measured) and isinstance(secure, Measured):
                ratios[(trainers, params)] = secure.figures.round_ms / plain.figures.round_ms
                print(line(case, plain, secure), flush=True)
                continue
            ratios[(trainers, params)] = None
            failed = [
                f"{kind} FAILED: {o}" for kind, o in zip(("plain", "secure"), outcomes) if isinstance(o, str)
            ]
            print(f"{trainers:>4} {params:>10,} {rounds - args.warmup:>6} | " + "; ".join(failed), flush=True)
    print(goal(ratios))
    print(f"# total {time.perf_counter() - started:.0f} s")
    if args.profile:
        print(f"# cProfile statistics in {args.profile}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 10 at the default P, few rounds")
    parser.add_argument("--trainers", type=int_list, help="comma-separated site counts (default 10,50,100)")
    parser.add_argument(
        "--params", type=int_list, help="comma-separated adapter sizes (default 74883,1200000)"
    )
    parser.add_argument("--rounds", type=int, help="rounds per case (default 20, quick 6)")
    parser.add_argument(
        "--rounds-large", type=int, help=f"rounds per case with P >= {LARGE_PARAMS:,} (default 12)"
    )
    parser.add_argument(
        "--warmup", type=int, help="rounds after round 0 left out of the figures (default 2, quick 1)"
    )
    parser.add_argument(
        "--profile", type=Path, help="write cProfile statistics of both processes to this folder"
    )
    args = parser.parse_args(argv)
    args.trainers = args.trainers or ([10] if args.quick else list(TRAINERS))
    args.params = args.params or ([DEFAULT_PARAMS] if args.quick else list(PARAMS))
    args.rounds = args.rounds or (6 if args.quick else 20)
    args.rounds_large = args.rounds_large or 12
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(bench(args))
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, or SIGTERM (which cancels the run)
        sys.exit(130)


if __name__ == "__main__":
    main()
