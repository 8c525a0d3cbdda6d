"""Command-line pieces shared by `python -m coordinator` and `python -m trainer`.

Every flag can also live in a TOML file given with `--config`: keys are the flag names with
dashes or underscores (`local-steps = 20`); flags on the command line win over the file.
"""

from __future__ import annotations

import argparse
import logging
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from phalanx.identity import printable
from phalanx.model import DEFAULT_MODEL, ModelConfig
from phalanx.partition import PARTITIONERS
from phalanx.rpc import TlsCredentials, TlsError
from phalanx.sites import DataConfig


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default and keeps the description's line breaks."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL, help="backbone: local model directory or hub name")
    group.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    group.add_argument("--lora-alpha", type=int, default=16, help="LoRA scaling alpha")
    group.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout")
    group.add_argument(
        "--target-modules", default="query,value", help="comma-separated module names that get LoRA matrices"
    )
    group.add_argument("--max-length", type=int, default=64, help="tokens per example after truncation")


DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def add_compute_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compute", "where a trainer computes (the coordinator hands these to --spawn-trainers)")
    group.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA, then MPS, then the CPU")
    group.add_argument(
        "--precision", choices=PRECISIONS, default="auto",
        help="autocast precision; auto: bf16 where the device does it natively (CUDA bf16, AVX512-BF16/AMX CPUs), else fp32",
    )  # fmt: skip


def compute_flags(args: argparse.Namespace) -> list[str]:
    return ["--device", args.device, "--precision", args.precision]


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data", default="tweets", help="packaged set (tweets, bbc-news) or a CSV / JSON Lines / Parquet file"
    )
    group.add_argument("--text-column", default="text", help="text column of a --data file")
    group.add_argument("--label-column", default="label", help="label column of a --data file")
    group.add_argument("--partitioner", choices=PARTITIONERS, default="iid", help="how sites split one data set")
    group.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (--partitioner dirichlet)")
    group.add_argument("--test-fraction", type=float, default=0.1, help="share of each site's data held out")
    group.add_argument(
        "--holdout-rows", type=int, default=0,
        help="rows of --data held out from every site, a global test set drawn by --seed (0: none)",
    )  # fmt: skip
    group.add_argument(
        "--labels", default="", help="the run's comma-separated label names in class order (default: those in --data)"
    )


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "security", "mutual TLS with certificates from `python -m phalanx.pki`; plaintext only on loopback or with --insecure"
    )
    group.add_argument("--ca", type=Path, help="the federation's CA certificate (PEM)")
    group.add_argument("--cert", type=Path, help="this process's certificate (PEM), signed by --ca")
    group.add_argument("--key", type=Path, help="the private key of --cert (PEM)")
    group.add_argument("--insecure", action="store_true", help="allow plaintext off loopback (no TLS, no identities)")


def tls_credentials(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TlsCredentials | None:
    """The TLS files named by --ca/--cert/--key (all three or none), loaded; exits with a message if unusable."""
    given = [args.ca, args.cert, args.key]
    if not any(given):
        return None
    if not all(given):
        parser.error("TLS needs all three of --ca, --cert and --key")
    if args.insecure:
        parser.error("--insecure and TLS certificates exclude each other")
    try:
        return TlsCredentials.load(args.ca, args.cert, args.key)
    except TlsError as exc:
        parser.error(str(exc))


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file with any of these options")
    parser.add_argument("--seed", type=int, default=0, help="seed for the adapter, sampling, partitioning and batches")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    add_tls_arguments(parser)
    add_model_arguments(parser)
    add_compute_arguments(parser)
    add_data_arguments(parser)


_KINDS = {int: "an integer", float: "a number", str: "a string"}


def toml_value(action: argparse.Action, value: Any) -> Any:
    """`value` from a TOML file as the flag of `action` takes it; ValueError naming the key otherwise."""
    key = action.dest.replace("_", "-")
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false")
        return value
    kind = action.type or str
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is Path:
        kind = str
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{key} must be {_KINDS.get(kind, kind.__name__)}, not {printable(value, 60)}")
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{key} must be one of {', '.join(map(str, action.choices))}, not {printable(value, 60)}")
    return value


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse argv, taking defaults from the `--config` TOML file first if one is named."""
    pre, _ = parser.parse_known_args(argv)
    if pre.config is not None:
        known = {a.dest for a in parser._actions}
        try:
            values = tomllib.loads(pre.config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            parser.error(f"cannot read --config {pre.config}: {exc}")
        defaults = {key.replace("-", "_"): value for key, value in values.items()}
        unknown = sorted(set(defaults) - known)
        if unknown:
            parser.error(f"unknown option(s) in {pre.config}: {', '.join(unknown)}")
        actions = {a.dest: a for a in parser._actions}
        try:
            defaults = {dest: toml_value(actions[dest], value) for dest, value in defaults.items()}
        except ValueError as exc:
            parser.error(f"in {pre.config}: {exc}")
        parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def model_config(args: argparse.Namespace, num_labels: int) -> ModelConfig:
    return ModelConfig(
        model=args.model,
        num_labels=num_labels,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=tuple(m.strip() for m in args.target_modules.split(",") if m.strip()),
        max_length=args.max_length,
        seed=args.seed,
    )


def data_config(args: argparse.Namespace) -> DataConfig:
    return DataConfig(
        source=args.data,
        text_column=args.text_column,
        label_column=args.label_column,
        partitioner=args.partitioner,
        alpha=args.alpha,
        test_fraction=args.test_fraction,
        seed=args.seed,
        label_names=label_names(args),
        holdout=args.holdout_rows,
    )


def label_names(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(name.strip() for name in args.labels.split(",") if name.strip())


def model_and_data_flags(args: argparse.Namespace) -> list[str]:
    """The model and data flags of `args` as a command line, to start trainers that match."""
    names = (
        "model", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "max_length",
        "data", "text_column", "label_column", "partitioner", "alpha", "test_fraction", "holdout_rows",
        "seed", "labels",
    )  # fmt: skip
    flags: list[str] = []
    for name in names:
        flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags


def configure_logging(level: str, component: str) -> None:
    """Log at `level` to stderr; grpc's own loggers stay at INFO or above, whose DEBUG lines
    (asyncio's "Loaded running loop" on every call) would drown ours."""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {component} %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("grpc").setLevel(max(logging.getLogger().level, logging.INFO))
