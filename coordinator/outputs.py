"""What a run leaves in --out: metrics.jsonl, checkpoints/ and the final adapter/.

Checkpoints are safetensors files (plain tensors and a string map, never pickle) written to a
temporary file, fsynced and renamed into place; `checkpoints/latest.json` names the newest one
with its SHA-256, which is verified before a checkpoint is trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

KEEP_CHECKPOINTS = 2


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or does not match its checksum."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    adapter: dict[str, np.ndarray]
    metadata: dict[str, str]


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class RunOutputs:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.metrics_path = out / "metrics.jsonl"
        self.checkpoints = out / "checkpoints"
        self.adapter_dir = out / "adapter"
        out.mkdir(parents=True, exist_ok=True)

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, sort_keys=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate_metrics(self, last_round: int) -> None:
        """Drop rows after `last_round` (written by a run that crashed before its next checkpoint)."""
        rows = [r for r in self.read_metrics() if r["round"] <= last_round]
        write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows).encode())

    def save_checkpoint(self, round_: int, adapter: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> Path:
        data = checkpoint_bytes(round_, adapter, metadata)
        self.checkpoints.mkdir(exist_ok=True)
        path = self.checkpoints / f"round-{round_:05d}.safetensors"
        write_atomic(path, data)
        pointer = {"round": round_, "file": path.name, "sha256": hashlib.sha256(data).hexdigest()}
        write_atomic(self.checkpoints / "latest.json", json.dumps(pointer).encode())
        for old in sorted(self.checkpoints.glob("round-*.safetensors"))[:-KEEP_CHECKPOINTS]:
            old.unlink()
        return path

    def load_latest_checkpoint(self) -> Checkpoint | None:
        pointer_path = self.checkpoints / "latest.json"
        if not pointer_path.exists():
            return None
        try:
            pointer = json.loads(pointer_path.read_text())
            data = (self.checkpoints / pointer["file"]).read_bytes()
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot read checkpoint named by {pointer_path}: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != pointer["sha256"]:
            raise CheckpointError(
                f"checkpoint {pointer['file']} does not match its SHA-256; start over with --fresh or restore it"
            )
        return checkpoint_of(data)


def checkpoint_bytes(round_: int, adapter: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """A checkpoint as a safetensors file: the adapter's tensors, and the metadata with the round."""
    return save_tensors(dict(adapter), metadata={**metadata, "round": str(round_)})


def checkpoint_of(data: bytes) -> Checkpoint:
    """The checkpoint in a safetensors file made by checkpoint_bytes."""
    metadata = _safetensors_metadata(data)
    return Checkpoint(int(metadata["round"]), dict(load_tensors(data)), metadata)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The string map in a safetensors header (8-byte little-endian length, then JSON)."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return dict(header.get("__metadata__", {}))
