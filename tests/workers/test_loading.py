"""Loading options and warm-up checks shared by the pipelines: dtype, device, a broken model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from modelmora_workers.pipelines.image_embedding import ImageEmbedding
from modelmora_workers.pipelines.image_to_text import ImageToText
from modelmora_workers.pipelines.text_generation import TextGeneration
from modelmora_workers.pipelines.text_to_image import TextToImage

from .params import worker_params


@pytest.mark.parametrize(
    ("cls", "fixture"),
    [(ImageEmbedding, "clip_dir"), (ImageToText, "blip_dir"), (TextGeneration, "gpt2_dir"), (TextToImage, "sd_dir")],
)
def test_bfloat16_loads_and_warms_up_on_cpu(cls: Any, fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    pipe = cls(str(path), device="cpu", dtype="bfloat16", options={})
    assert pipe.device == "cpu"
    pipe.warmup()
    module = pipe.pipe.unet if isinstance(pipe, TextToImage) else pipe.model
    assert next(module.parameters()).dtype == torch.bfloat16


def test_bfloat16_embeddings_are_float32(clip_dir: Path, images: list[np.ndarray]) -> None:
    pipe = ImageEmbedding(str(clip_dir), device="auto", dtype="bfloat16", options={})
    out = pipe.run({"image": images[:2]}, worker_params("img2embed", normalize=True, batch_size=2))["embeddings"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_warmup_fails_on_a_broken_embedding_model(clip_dir: Path) -> None:
    pipe = ImageEmbedding(str(clip_dir), device="cpu", dtype="auto", options={})
    with torch.no_grad():
        pipe.model.visual_projection.weight.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="finite"):
        pipe.warmup()


def test_warmup_fails_on_a_broken_language_model(gpt2_dir: Path) -> None:
    pipe = TextGeneration(str(gpt2_dir), device="cpu", dtype="auto", options={})
    with torch.no_grad():
        pipe.model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="finite"):
        pipe.warmup()


def test_unknown_dtype_is_refused(gpt2_dir: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        TextGeneration(str(gpt2_dir), device="cpu", dtype="int8", options={})


def test_zero_max_tokens_generates_nothing(
    txt2txt: TextGeneration, img2txt: ImageToText, images: list[np.ndarray]
) -> None:
    nothing = {"texts": [""], "finish_reasons": ["length"]}
    generated = txt2txt.run({"text": ["Hello"]}, worker_params("txt2txt", max_tokens=0))
    assert {k: generated[k] for k in nothing} == nothing and list(generated["completion_tokens"]) == [0]
    assert img2txt.run({"image": images[:1]}, worker_params("img2txt", max_tokens=0)) == nothing
