"""The install check: a model's files must be laid out as its task's loader expects."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from modelmora.errors import InvalidInput
from modelmora.registry import SQLiteStore, install
from modelmora.registry.layout import check_layout, find_model_dir

import tiny_models

TINY: list[tuple[str, str]] = [
    ("gpt2", "txt2txt"),
    ("t5", "txt2txt"),
    ("bart", "txt2txt"),
    ("blip", "img2txt"),
    ("clip", "img2embed"),
    ("sd", "txt2img"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny test model, built once for this module (as tests/e2e and tests/workers build them)."""
    root = tmp_path_factory.mktemp("tiny")
    builders: dict[str, Callable[[Path], Path]] = {name: getattr(tiny_models, f"build_{name}") for name, _ in TINY}
    return {name: build(root / name) for name, build in builders.items()}


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    return SQLiteStore(tmp_path / "home" / "registry.sqlite3")


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_the_real_minilm_passes(minilm_path: Path) -> None:
    assert check_layout(minilm_path, "txt2embed") is None


@pytest.mark.parametrize(("name", "task"), TINY)
def test_every_tiny_model_passes_for_its_task(tiny: dict[str, Path], name: str, task: str) -> None:
    assert check_layout(tiny[name], task) is None


@pytest.mark.parametrize(("name", "task"), TINY)
def test_every_tiny_model_installs_with_its_detected_task(
    tiny: dict[str, Path], store: SQLiteStore, tmp_path: Path, name: str, task: str
) -> None:
    rec = install(store, tmp_path / "home", str(tiny[name]))
    assert rec.task == task


def test_model_in_a_subfolder_is_refused_naming_the_subfolder(
    minilm_path: Path, store: SQLiteStore, tmp_path: Path
) -> None:
    src = tmp_path / "download"
    _copy(minilm_path, src / "all-MiniLM-L6-v2")
    (src / "README.md").write_text("the model is in the folder\n")
    with pytest.raises(InvalidInput) as err:
        install(store, tmp_path / "home", str(src))  # detected as txt2embed: modules.json lies below the top
    message = err.value.message
    assert "\n" not in message
    assert "not laid out as a model for txt2embed: no modules.json" in message
    assert f"found modules.json (txt2embed) in all-MiniLM-L6-v2/: install {src}/all-MiniLM-L6-v2" in message
    assert store.list() == []
    assert not (tmp_path / "home" / "models" / "download").exists()
    assert not list((tmp_path / "home" / "models").glob(".staging-*"))
    # the suggested path installs
    rec = install(store, tmp_path / "home", f"{src}/all-MiniLM-L6-v2")
    assert rec.task == "txt2embed" and "modules.json" in rec.versions[0].files


def test_a_model_below_an_undetectable_top_is_suggested(
    tiny: dict[str, Path], store: SQLiteStore, tmp_path: Path
) -> None:
    src = tmp_path / "repo"
    _copy(tiny["clip"], src / "weights" / "clip")
    with pytest.raises(InvalidInput) as err:
        install(store, tmp_path / "home", str(src))
    assert "pass --task" in err.value.message
    assert f"found config.json (img2embed) in weights/clip/: install {src}/weights/clip" in err.value.message


@pytest.mark.parametrize(
    ("name", "task", "remove", "needle"),
    [
        ("minilm", "txt2embed", ["tokenizer.json", "vocab.txt"], "Transformer module in ./, which has no tokenizer"),
        ("minilm", "txt2embed", ["model.safetensors"], "no weights (*.safetensors or pytorch_model.bin)"),
        ("clip", "img2embed", ["preprocessor_config.json", "processor_config.json"], "no image processor config"),
        ("clip", "img2embed", ["config.json"], "no config.json"),
        ("gpt2", "txt2txt", ["tokenizer.json"], "no tokenizer files"),
        ("blip", "img2txt", ["model.safetensors"], "no weights"),
        ("sd", "txt2img", ["unet/diffusion_pytorch_model.safetensors"], "component 'unet' has no weights"),
        ("sd", "txt2img", ["vae"], "names the component 'vae', and there is no folder vae/"),
        ("sd", "txt2img", ["model_index.json"], "no model_index.json"),
    ],
)
def test_missing_files_are_named(
    tiny: dict[str, Path],
    minilm_path: Path,
    store: SQLiteStore,
    tmp_path: Path,
    name: str,
    task: str,
    remove: list[str],
    needle: str,
) -> None:
    src = _copy(minilm_path if name == "minilm" else tiny[name], tmp_path / name)
    for rel in remove:
        path = src / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert needle in (check_layout(src, task) or "")
    with pytest.raises(InvalidInput) as err:
        install(store, tmp_path / "home", str(src), task=task)
    assert needle in err.value.message and err.value.field == "source"
    assert store.list() == []
    # a stand-in pipeline may read anything: the check can be turned off
    assert install(store, tmp_path / "home", str(src), task=task, check_files=False).task == task


@pytest.mark.parametrize(
    ("name", "task", "needle"),
    [
        ("clip", "txt2txt", "config.json names CLIPModel, an architecture for img2embed"),
        ("clip", "img2txt", "config.json names CLIPModel, an architecture for img2embed"),
        ("blip", "img2embed", "config.json names BlipForConditionalGeneration, an architecture for img2txt"),
        ("gpt2", "img2embed", "no image processor config"),
        ("sd", "txt2embed", "no modules.json (sentence-transformers) or config.json (transformers) at the top"),
        ("gpt2", "txt2img", "no model_index.json"),
    ],
)
def test_a_task_that_does_not_fit_the_files_is_refused(
    tiny: dict[str, Path], store: SQLiteStore, tmp_path: Path, name: str, task: str, needle: str
) -> None:
    with pytest.raises(InvalidInput) as err:
        install(store, tmp_path / "home", str(tiny[name]), task=task)
    assert needle in err.value.message


def test_an_encoder_without_a_generation_head_is_refused_for_txt2txt(tiny: dict[str, Path], tmp_path: Path) -> None:
    src = _copy(tiny["gpt2"], tmp_path / "bert")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    assert "config.json names BertModel, which has no text generation head" in (check_layout(src, "txt2txt") or "")
    (src / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    assert check_layout(src, "txt2txt") is None


def test_unreadable_json_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "modules.json").write_text("{not json")
    assert check_layout(tmp_path, "txt2embed") == "modules.json is not readable JSON (JSONDecodeError)"
    (tmp_path / "modules.json").unlink()
    (tmp_path / "model_index.json").write_text("[1, 2]")
    assert check_layout(tmp_path, "txt2img") == "model_index.json is not a JSON object"


def test_find_model_dir_looks_three_levels_deep(minilm_path: Path, tmp_path: Path) -> None:
    _copy(minilm_path, tmp_path / "a" / "b" / "c" / "m")
    assert find_model_dir(tmp_path, "txt2embed") is None  # four levels
    assert find_model_dir(tmp_path / "a", "txt2embed") == ("b/c/m", "modules.json", "txt2embed")
