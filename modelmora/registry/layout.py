"""Whether a model's files are laid out as its task's loader expects, checked at install.

The workers load a model with sentence-transformers, transformers or diffusers; here we only
look at file names and the small JSON files that name the rest (modules.json, config.json,
model_index.json), so the supervisor never imports those libraries. What each task needs at
the top of the model directory:

- txt2embed: a sentence-transformers layout (modules.json; its Transformer module holds
  config.json, tokenizer files and weights), or a transformers encoder (config.json, tokenizer
  files and weights) that sentence-transformers wraps with mean pooling;
- img2embed: config.json, weights and an image processor config; img2txt: the same plus
  tokenizer files; txt2txt: config.json, weights and tokenizer files. Where config.json names
  an architecture, it must fit the task (a CLIPModel cannot caption, a BertModel cannot
  generate text);
- txt2img: a diffusers model_index.json whose components each have their folder, with weights
  in the folders of model components.

`find_model_dir` looks below the top for a directory that would pass, so that an error can
say where the model is.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

__all__ = ("architecture_task", "check_layout", "find_model_dir")

_WEIGHTS = "weights (*.safetensors or pytorch_model.bin)"
_TOKENIZER = "tokenizer files (tokenizer.json, vocab.txt, vocab.json or a sentencepiece *.model)"
_TOKENIZER_FILES = frozenset({"tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model"})
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_GENERATION_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "WithLMHead", "MTModel")
_GENERATION_MODELS = frozenset({"EncoderDecoderModel"})

_ARCHITECTURE_TASKS: tuple[tuple[str, str], ...] = (
    ("CLIPModel", "img2embed"),
    ("SiglipModel", "img2embed"),
    ("VisionEncoderDecoderModel", "img2txt"),
    ("ForCausalLM", "txt2txt"),
    ("LMHeadModel", "txt2txt"),
)
"""Suffixes of `architectures` in config.json and their task (*ForConditionalGeneration: see below)."""

_INCOMPATIBLE: dict[str, frozenset[str]] = {
    "txt2embed": frozenset({"img2embed", "img2txt"}),
    "img2embed": frozenset({"img2txt", "txt2txt"}),
    "img2txt": frozenset({"img2embed"}),
    "txt2txt": frozenset({"img2embed", "img2txt"}),
}
"""Task asked for -> tasks of architectures its loader cannot use. Generative multimodal models
(`*ForConditionalGeneration`) read as txt2txt, so img2txt does not refuse txt2txt."""

MAX_DEPTH = 3
"""How deep `find_model_dir` looks below the top of a model directory."""


def architecture_task(config: dict[str, Any]) -> tuple[str, str] | None:
    """The first architecture in config.json whose task we know, and that task."""
    archs = config.get("architectures") or []
    for arch in archs if isinstance(archs, list) else []:
        if not isinstance(arch, str):
            continue
        if arch.startswith(("Blip", "Git", "Pix2Struct")) and arch.endswith("ForConditionalGeneration"):
            return arch, "img2txt"
        if arch.endswith("ForConditionalGeneration"):
            return arch, "txt2txt"  # T5, BART...: text to text
        for suffix, task in _ARCHITECTURE_TASKS:
            if arch.endswith(suffix):
                return arch, task
    return None


def _names(d: Path) -> set[str]:
    try:
        return {p.name for p in d.iterdir() if p.is_file()}
    except OSError:
        return set()


def _has_weights(names: set[str]) -> bool:
    return any(
        n.endswith(".safetensors")
        or (n.endswith(".bin") and n.startswith(("pytorch_model", "diffusion_pytorch_model")))
        for n in names
    )


def _has_tokenizer(names: set[str]) -> bool:
    return bool(names & _TOKENIZER_FILES) or any(n.endswith(".model") for n in names)


def _read_json(path: Path) -> Any:
    """The parsed file; raises ValueError (with a phrase for the user) when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path.name} is not readable JSON ({type(exc).__name__})") from None


def _missing(names: set[str], *, weights: bool = True, tokenizer: bool = False, processor: bool = False) -> list[str]:
    out = []
    if "config.json" not in names:
        out.append("config.json")
    if weights and not _has_weights(names):
        out.append(_WEIGHTS)
    if tokenizer and not _has_tokenizer(names):
        out.append(_TOKENIZER)
    if processor and not any(n in names for n in _IMAGE_PROCESSOR_FILES):
        out.append("image processor config (preprocessor_config.json or processor_config.json)")
    return out


def _no(what: list[str], where: str = "") -> str:
    place = f" in {where}/" if where else ""
    return f"no {' and no '.join(what)}{place}"


def _architecture_problem(config: dict[str, Any], task: str) -> str | None:
    found = architecture_task(config)
    if found is not None and found[1] in _INCOMPATIBLE.get(task, frozenset()):
        return f"config.json names {found[0]}, an architecture for {found[1]}"
    if task == "txt2txt":
        archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
        if archs and not any(a.endswith(_GENERATION_HEADS) or a in _GENERATION_MODELS for a in archs):
            return f"config.json names {archs[0]}, which has no text generation head (e.g. *ForCausalLM)"
    return None


def _check_transformers(root: Path, task: str) -> str | None:
    names = _names(root)
    missing = _missing(
        names,
        tokenizer=task in ("txt2embed", "img2txt", "txt2txt"),
        processor=task in ("img2embed", "img2txt"),
    )
    if missing:
        return _no(missing)
    config = _read_json(root / "config.json")
    if not isinstance(config, dict):
        return "config.json is not a JSON object"
    return _architecture_problem(config, task)


def _check_sentence_transformers(root: Path) -> str | None:
    modules = _read_json(root / "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        return "modules.json is not a list of modules"
    folders = [str(m.get("path") or "") for m in modules if str(m.get("type", "")).endswith("Transformer")]
    for folder in folders:
        missing = _missing(_names(root / folder), tokenizer=True)
        if missing:
            return f"modules.json names a Transformer module in {folder or '.'}/, which has {_no(missing)}"
    if not folders:  # other first modules (e.g. CLIPModel): their weights lie somewhere in the modules
        places = [root] + [root / str(m.get("path")) for m in modules if m.get("path")]
        if not any(_has_weights(_names(p)) for p in places):
            return _no([_WEIGHTS], "the top or the modules' folders")
    return None


def _check_diffusers(root: Path) -> str | None:
    index = _read_json(root / "model_index.json")
    if not isinstance(index, dict):
        return "model_index.json is not a JSON object"
    for name, value in sorted(index.items()):
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or None in value:
            continue
        folder = root / name
        if not folder.is_dir():
            return f"model_index.json names the component {name!r}, and there is no folder {name}/"
        names = _names(folder)
        if "config.json" in names and not _has_weights(names):
            return f"the component {name!r} has {_no([_WEIGHTS], name)}"
    return None


def check_layout(root: Path, task: str) -> str | None:
    """None when the files at the top of `root` are laid out as `task`'s loader expects; else
    what is wrong, as a phrase ("no config.json and no weights (...)")."""
    names = _names(root)
    try:
        if task == "txt2embed":
            if "modules.json" in names:
                return _check_sentence_transformers(root)
            if "config.json" in names:
                return _check_transformers(root, task)
            return "no modules.json (sentence-transformers) or config.json (transformers) at the top"
        if task == "txt2img":
            if "model_index.json" not in names:
                return "no model_index.json (a diffusers pipeline) at the top"
            return _check_diffusers(root)
        if task in ("img2embed", "img2txt", "txt2txt"):
            return _check_transformers(root, task)
    except ValueError as exc:
        return str(exc)
    return None


def _marker(names: set[str], task: str) -> str:
    for name in ("modules.json", "model_index.json", "config.json"):
        if name in names:
            return name
    return task


def _detect(root: Path, names: set[str]) -> str | None:
    if "modules.json" in names:
        return "txt2embed"
    if "model_index.json" in names:
        return "txt2img"
    if "config.json" in names:
        try:
            config = _read_json(root / "config.json")
        except ValueError:
            return None
        found = architecture_task(config) if isinstance(config, dict) else None
        return found[1] if found else None
    return None


def find_model_dir(root: Path, task: str | None) -> tuple[str, str, str] | None:
    """The first directory below `root` (breadth first, at most `MAX_DEPTH` deep, hidden folders
    skipped) whose files pass `check_layout` for `task` (for the task they show when None).

    Returns:
        (its path relative to `root`, `/`-separated; the file that marks it, e.g. "modules.json";
        its task), or None.
    """
    todo: deque[tuple[Path, int]] = deque([(root, 0)])
    while todo:
        d, depth = todo.popleft()
        if depth:
            names = _names(d)
            want = task or _detect(d, names)
            if want is not None and check_layout(d, want) is None:
                return d.relative_to(root).as_posix(), _marker(names, want), want
        if depth < MAX_DEPTH:
            try:
                subs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            todo.extend((p, depth + 1) for p in subs)
    return None
