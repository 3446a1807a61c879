"""The tiny model builders: complete directories a user would register, reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiny_models import build_gpt2


@pytest.mark.parametrize(
    ("fixture", "architecture", "files"),
    [
        ("gpt2_dir", "GPT2LMHeadModel", {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}),
        ("blip_dir", "BlipForConditionalGeneration", {"preprocessor_config.json", "tokenizer.json"}),
        ("clip_dir", "CLIPModel", {"preprocessor_config.json", "tokenizer.json"}),
    ],
)
def test_transformers_dirs_name_their_architecture(
    fixture: str, architecture: str, files: set[str], request: pytest.FixtureRequest
) -> None:
    path: Path = request.getfixturevalue(fixture)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [architecture]
    assert files | {"config.json", "model.safetensors"} <= {p.name for p in path.iterdir()}
    assert json.loads((path / "tokenizer_config.json").read_text())["model_max_length"] <= 128


def test_sd_dir_has_a_model_index(sd_dir: Path) -> None:
    index = json.loads((sd_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (sd_dir / part).is_dir()


def test_builds_are_reproducible(gpt2_dir: Path, tmp_path: Path) -> None:
    again = build_gpt2(tmp_path / "gpt2")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (gpt2_dir / name).read_bytes()
