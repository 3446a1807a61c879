"""Fixtures for the in-process pipeline tests: tiny models built once per session, pipelines loaded once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from modelmora_workers.pipelines.image_embedding import ImageEmbedding
from modelmora_workers.pipelines.image_to_text import ImageToText
from modelmora_workers.pipelines.text_generation import TextGeneration
from modelmora_workers.pipelines.text_to_image import TextToImage

from tiny_models import build_blip, build_clip, build_gpt2, build_sd


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread, as the workers run in tests: tiny models on a busy 2-core machine
    run ~10x slower with several threads contending."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpt2(tmp_path_factory.mktemp("models") / "gpt2")


@pytest.fixture(scope="session")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_blip(tmp_path_factory.mktemp("models") / "blip")


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_clip(tmp_path_factory.mktemp("models") / "clip")


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sd(tmp_path_factory.mktemp("models") / "sd")


@pytest.fixture(scope="session")
def txt2txt(gpt2_dir: Path) -> TextGeneration:
    pipe = TextGeneration(str(gpt2_dir), device="auto", dtype="auto", options={})
    pipe.warmup()
    return pipe


@pytest.fixture(scope="session")
def img2txt(blip_dir: Path) -> ImageToText:
    pipe = ImageToText(str(blip_dir), device="auto", dtype="auto", options={})
    pipe.warmup()
    return pipe


@pytest.fixture(scope="session")
def img2embed(clip_dir: Path) -> ImageEmbedding:
    pipe = ImageEmbedding(str(clip_dir), device="auto", dtype="auto", options={})
    pipe.warmup()
    return pipe


@pytest.fixture(scope="session")
def txt2img(sd_dir: Path) -> TextToImage:
    pipe = TextToImage(str(sd_dir), device="auto", dtype="auto", options={})
    pipe.warmup()
    return pipe


@pytest.fixture(scope="session")
def images() -> list[np.ndarray]:
    """Five distinct RGB images of different sizes (uint8, (h, w, 3))."""
    rng = np.random.default_rng(1234)
    shapes = [(32, 32), (48, 40), (20, 64), (33, 17), (64, 64)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
