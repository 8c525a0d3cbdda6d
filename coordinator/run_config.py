"""A run's configuration: the one-shot command's run flags, or the same keys in a submitted TOML file.

`add_run_arguments` defines the flags (rounds, privacy, secure aggregation); with the model and
data flags of `phalanx.cli` and `--seed` they make up a run. A serving coordinator reads a
submitted TOML file with `parse_run_toml`: each key is checked against its flag's type and
choices, and the same `run_problems` checks apply as on the command line.
"""

from __future__ import annotations

import argparse
import tomllib
from typing import Any

from coordinator.aggregation import AGGREGATORS
from coordinator.config import BATCH_ORDERS, LORA_VARIANTS, RoundConfig, RunConfig
from coordinator.selection import SELECTIONS, SelectionConfig
from coordinator.server_optimizers import SERVER_OPTIMIZERS, ServerOptimizerConfig, create_server_optimizer
from coordinator.stopping import StoppingRules
from phalanx.cli import add_data_arguments, add_model_arguments, model_config, toml_value
from phalanx.codec import WIRE_DTYPES
from phalanx.identity import printable
from phalanx.privacy import ACCOUNTANTS

MAX_CONFIG_BYTES = 64 * 1024


class RunConfigError(ValueError):
    """A submitted run configuration that cannot be used; the message names the problem."""


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    rounds = parser.add_argument_group("rounds")
    rounds.add_argument("--rounds", type=int, default=8, help="federated rounds")
    rounds.add_argument("--min-trainers", type=int, default=2, help="trainers needed to start and to accept a round")
    rounds.add_argument("--fraction-train", type=float, default=1.0, help="share of live trainers sampled per round")
    rounds.add_argument("--fraction-evaluate", type=float, default=1.0, help="share of live trainers that evaluate")
    rounds.add_argument("--local-steps", type=int, default=15, help="optimizer steps per trainer per round")
    rounds.add_argument("--batch-size", type=int, default=32, help="training batch size")
    rounds.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    rounds.add_argument(
        "--batch-order", choices=BATCH_ORDERS, default="grouped",
        help="trainers' batches: grouped by length (least padding) or drawn at random",
    )  # fmt: skip
    rounds.add_argument("--eval-max-examples", type=int, default=400, help="test examples per trainer (0: all)")
    rounds.add_argument(
        "--evaluate-every", type=int, default=1, help="evaluate rounds 0, N, 2N, ...; the last round always evaluates"
    )
    rounds.add_argument("--round-timeout", type=float, default=300.0, help="seconds a trainer has to answer a call")
    rounds.add_argument("--round-retries", type=int, default=0, help="times a failed round is tried again")
    rounds.add_argument("--aggregator", choices=AGGREGATORS, default="fedavg", help="aggregation strategy")
    rounds.add_argument("--trim", type=float, default=0.2, help="share cut at each end per coordinate by trimmed-mean")
    rounds.add_argument("--clip-norm", type=float, default=0.0, help="clip each update's L2 norm to this (0: off)")
    rounds.add_argument(
        "--deterministic", action="store_true", help="fold replies in a fixed order: bit-identical reruns, more memory"
    )
    rounds.add_argument("--wire-dtype", choices=sorted(WIRE_DTYPES), default="float32", help="adapter dtype on the wire")
    learning = parser.add_argument_group("learning", "server optimisers, FedProx, LoRA variants and client selection")
    learning.add_argument(
        "--server-optimizer", choices=SERVER_OPTIMIZERS, default="none",
        help="step the global adapter with each round's aggregate as a pseudo-gradient (Reddi et al. 2021)",
    )  # fmt: skip
    learning.add_argument("--server-lr", type=float, default=0.0, help="server learning rate; 0: 1 for fedavgm, 0.01 adaptive")
    learning.add_argument("--server-momentum", type=float, default=0.9, help="fedavgm's momentum β")
    learning.add_argument("--server-beta1", type=float, default=0.9, help="β1 of fedadam, fedyogi, fedadagrad")
    learning.add_argument("--server-beta2", type=float, default=0.99, help="β2 of fedadam and fedyogi")
    learning.add_argument("--server-tau", type=float, default=1e-3, help="τ, the adaptivity of fedadam, fedyogi, fedadagrad")
    learning.add_argument("--proximal-mu", type=float, default=0.0, help="FedProx: μ/2·‖w − w_global‖² on trainers (0: off)")
    learning.add_argument(
        "--krum-byzantine", type=int, default=-1, help="replies krum and multi-krum tolerate as Byzantine (-1: (n − 3) // 2)"
    )
    learning.add_argument("--multi-krum-keep", type=int, default=0, help="replies multi-krum averages (0: n − f)")
    learning.add_argument(
        "--lora-variant", choices=LORA_VARIANTS, default="standard",
        help="ffa: lora_A frozen at seeded values and never sent, only lora_B and the head federated (exact averaging)",
    )  # fmt: skip
    learning.add_argument(
        "--mixed-ranks", action="store_true",
        help="sites train at their own --lora-r; the coordinator averages the products B·A and sends each site its rank",
    )  # fmt: skip
    learning.add_argument("--selection", choices=SELECTIONS, default="uniform", help="how a round picks its trainers")
    learning.add_argument("--selection-min-cores", type=int, default=0, help="resource/performance: skip sites with fewer cores")
    learning.add_argument(
        "--selection-min-memory-gb", type=float, default=0.0, help="resource/performance: skip sites with less memory"
    )
    learning.add_argument(
        "--selection-explore", type=float, default=0.1, help="performance: share of a round's trainers drawn at random"
    )
    stopping = parser.add_argument_group("stopping rules", "end the run before --rounds; judged after each evaluated round")
    stopping.add_argument("--target-accuracy", type=float, default=0.0, help="stop once accuracy reaches this (0: off)")
    stopping.add_argument("--target-loss", type=float, default=0.0, help="stop once evaluation loss falls to this (0: off)")
    stopping.add_argument(
        "--patience", type=int, default=0, help="stop when accuracy improved by less than --min-delta over N evaluated rounds (0: off)"
    )
    stopping.add_argument("--min-delta", type=float, default=0.0, help="the improvement --patience asks for")
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


def run_problems(args: argparse.Namespace, *, can_sign: bool) -> list[str]:
    """What is wrong with a run's settings; `can_sign`: the sites will have certificates (secure aggregation)."""
    checks = [
        (args.rounds >= 1, "--rounds must be at least 1"),
        (args.min_trainers >= 1, "--min-trainers must be at least 1"),
        (0 < args.fraction_train <= 1, "--fraction-train must be in (0, 1]"),
        (0 < args.fraction_evaluate <= 1, "--fraction-evaluate must be in (0, 1]"),
        (args.local_steps >= 1, "--local-steps must be at least 1"),
        (args.evaluate_every >= 1, "--evaluate-every must be at least 1"),
        (args.batch_size >= 1 and args.lr > 0, "--batch-size must be at least 1 and --lr positive"),
        (args.round_timeout > 0, "--round-timeout must be positive"),
        (args.round_retries >= 0, "--round-retries cannot be negative"),
        (0 <= args.trim < 0.5, "--trim must be in [0, 0.5)"),
        (args.clip_norm >= 0, "--clip-norm cannot be negative"),
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
    if args.dp_noise_multiplier > 0 or args.dp_target_epsilon > 0:
        checks.append(
            (args.selection == "uniform", "differential privacy needs --selection uniform: its accounting assumes uniform sampling")
        )
    checks += [
        (args.proximal_mu >= 0, "--proximal-mu cannot be negative"),
        (args.multi_krum_keep >= 0 and args.krum_byzantine >= -1, "--multi-krum-keep cannot be negative, --krum-byzantine below -1"),
    ]
    try:
        create_server_optimizer(server_optimizer_config(args), {})
    except ValueError as exc:
        checks.append((False, f"--server-optimizer settings: {exc}"))
    try:
        selection_config(args)
    except ValueError as exc:
        checks.append((False, str(exc)))
    checks += [(False, message) for message in stopping_rules(args).problems()]
    if args.mixed_ranks:
        checks += [
            (args.aggregator == "fedavg", "--mixed-ranks works with --aggregator fedavg only"),
            (args.lora_variant == "standard", "--mixed-ranks and --lora-variant ffa exclude each other"),
            (args.server_optimizer == "none", "--mixed-ranks works with --server-optimizer none only"),
            (not args.secure_aggregation, "--mixed-ranks needs each site's factors; secure aggregation gives only their sum"),
            (
                args.dp_noise_multiplier == 0 and args.dp_target_epsilon == 0 and args.clip_norm == 0,
                "--mixed-ranks does not clip or noise updates: drop --clip-norm and the DP settings",
            ),
        ]
    if args.secure_aggregation:
        checks += [
            (
                args.aggregator == "fedavg",
                f"--aggregator {args.aggregator} needs each site's update; secure aggregation gives only their sum",
            ),
            (
                can_sign,
                (
                    "secure aggregation needs certificates (--ca/--cert/--key, or --spawn-trainers without --insecure): "
                    "sites sign their keys with them"
                ),
            ),
            (args.secagg_neighbours >= 0 and args.secagg_threshold >= 0, "--secagg-neighbours/-threshold cannot be negative"),
            (args.secagg_range >= 0, "--secagg-range cannot be negative"),
        ]
    return [message for ok, message in checks if not ok]


def round_config(args: argparse.Namespace) -> RoundConfig:
    return RoundConfig(
        rounds=args.rounds,
        min_trainers=args.min_trainers,
        fraction_train=args.fraction_train,
        fraction_evaluate=args.fraction_evaluate,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        batch_order=args.batch_order,
        eval_max_examples=args.eval_max_examples,
        evaluate_every=args.evaluate_every,
        round_timeout=args.round_timeout,
        aggregator=args.aggregator,
        trim=args.trim,
        server_optimizer=server_optimizer_config(args),
        proximal_mu=args.proximal_mu,
        krum_byzantine=args.krum_byzantine,
        multi_krum_keep=args.multi_krum_keep,
        lora_variant=args.lora_variant,
        mixed_ranks=args.mixed_ranks,
        selection=selection_config(args),
        stopping=stopping_rules(args),
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


def server_optimizer_config(args: argparse.Namespace) -> ServerOptimizerConfig:
    return ServerOptimizerConfig(
        args.server_optimizer, args.server_lr, args.server_momentum, args.server_beta1, args.server_beta2, args.server_tau
    )


def stopping_rules(args: argparse.Namespace) -> StoppingRules:
    return StoppingRules(args.target_accuracy, args.target_loss, args.patience, args.min_delta)


def selection_config(args: argparse.Namespace) -> SelectionConfig:
    """Raises ValueError naming the flag of a setting out of range."""
    return SelectionConfig(args.selection, args.selection_min_cores, args.selection_min_memory_gb, args.selection_explore)


def run_config(args: argparse.Namespace, labels: tuple[str, ...], *, start_with: int = 0, register_timeout: float = 300.0) -> RunConfig:
    return RunConfig(round_config(args), model_config(args, len(labels)), labels, start_with, register_timeout)


def run_parser() -> argparse.ArgumentParser:
    """The options a submitted run may set: the run flags, the model and data flags, and --seed."""
    parser = argparse.ArgumentParser(prog="run configuration", add_help=False)
    add_run_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--register-timeout", type=float, default=300.0, help="seconds to wait for --min-trainers")
    return parser


def _checked(action: argparse.Action, value: Any) -> Any:
    """`value` from TOML as the flag of `action` takes it; raise RunConfigError naming the key otherwise."""
    try:
        return toml_value(action, value)
    except ValueError as exc:
        raise RunConfigError(str(exc)) from None


def parse_run_toml(text: str, *, can_sign: bool) -> argparse.Namespace:
    """A run's settings from TOML text with the run flags' names as keys; raise RunConfigError if unusable."""
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise RunConfigError(f"the run configuration is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RunConfigError(f"the run configuration is not TOML: {printable(exc, 200)}") from None
    parser = run_parser()
    actions = {a.dest: a for a in parser._actions}
    settings = {}
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in actions:
            raise RunConfigError(f"unknown run option {printable(key, 60)} (federation options belong on the coordinator)")
        settings[dest] = _checked(actions[dest], value)
    args = parser.parse_args([])
    vars(args).update(settings)
    problems = run_problems(args, can_sign=can_sign)
    if problems:
        raise RunConfigError("; ".join(problems))
    return args
