"""Embedding batches larger than "batch_size" run in sub-batches and stop at a cancel (issue 12).

In process with the real all-MiniLM-L6-v2 (sub-batches counted through the model's tokenizer call,
one per forward pass), and with a real worker process: a cancelled large batch is reported
cancelled and the worker serves the next request.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from modelmora.errors import ModelUnavailable
from modelmora.ipc import segments
from modelmora.lifecycle import WorkerHandle, WorkerSpec
from modelmora_workers import cancel
from modelmora_workers.pipelines.image_embedding import ImageEmbedding
from modelmora_workers.pipelines.text_embedding import TextEmbedding

from .params import worker_params
from conftest import worker_env

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "model",
    "servers",
    "batch",
    "many",
    "requests",
    "on",
    "streams",
]


def texts(count: int, words: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, words))) for _ in range(count)]


@pytest.fixture(scope="module")
def txt2embed(minilm_path: Path) -> TextEmbedding:
    pipe = TextEmbedding(str(minilm_path), device="cpu", dtype="auto", options={})
    pipe.warmup()
    return pipe


@dataclass
class Passes:
    """The forward passes a pipeline ran (their sizes), and a hook called with each pass's number."""

    sizes: list[int] = field(default_factory=list)
    on_pass: Callable[[int], None] = lambda number: None


@pytest.fixture
def passes(txt2embed: TextEmbedding, monkeypatch: pytest.MonkeyPatch) -> Passes:
    """Counts `txt2embed`'s forward passes through its tokenizer call (one before each pass)."""
    seen = Passes()
    preprocess = txt2embed.model.preprocess

    def counted(batch: list[Any], *args: Any, **kwargs: Any) -> Any:
        seen.sizes.append(len(batch))
        seen.on_pass(len(seen.sizes))
        return preprocess(batch, *args, **kwargs)

    monkeypatch.setattr(txt2embed.model, "preprocess", counted)
    return seen


@pytest.mark.parametrize("normalize", [False, True])
def test_a_large_batch_gives_the_rows_of_one_encode(txt2embed: TextEmbedding, passes: Passes, normalize: bool) -> None:
    batch = texts(37, 60)
    got = txt2embed.run({"text": batch}, worker_params("txt2embed", batch_size=8, normalize=normalize))["embeddings"]
    assert passes.sizes == [8, 8, 8, 8, 5]
    want = txt2embed.model.encode(batch, batch_size=64, normalize_embeddings=normalize, convert_to_numpy=True)
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == (37, 384)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_batch_within_batch_size_is_one_pass(txt2embed: TextEmbedding, passes: Passes) -> None:
    got = txt2embed.run({"text": texts(8, 60)}, worker_params("txt2embed", batch_size=8))["embeddings"]
    assert passes.sizes == [8] and got.shape == (8, 384)


def test_a_cancelled_large_batch_stops_after_one_sub_batch(txt2embed: TextEmbedding, passes: Passes) -> None:
    """The issue's case: 2,048 texts of up to 300 words; the cancel arrives during the first forward pass."""
    passes.on_pass = lambda number: cancel.request(41)
    with cancel.running(41), pytest.raises(cancel.Cancelled):
        txt2embed.run({"text": texts(2048, 300)}, worker_params("txt2embed", batch_size=32))
    assert passes.sizes == [32]
    assert not cancel.is_cancelled()
    assert txt2embed.run({"text": ["after"]}, worker_params("txt2embed", batch_size=32))["embeddings"].shape == (1, 384)


@pytest.mark.parametrize("count", [4, 100])
def test_a_batch_cancelled_before_it_starts_runs_no_pass(txt2embed: TextEmbedding, passes: Passes, count: int) -> None:
    with cancel.running(42), pytest.raises(cancel.Cancelled):
        cancel.request(42)
        txt2embed.run({"text": texts(count, 20)}, worker_params("txt2embed", batch_size=8))
    assert passes.sizes == []


def test_a_cancelled_image_batch_stops_after_one_sub_batch(
    img2embed: ImageEmbedding, images: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    embed = img2embed._embed

    def counted(batch: list[np.ndarray]) -> np.ndarray:
        sizes.append(len(batch))
        cancel.request(43)
        return embed(batch)

    monkeypatch.setattr(img2embed, "_embed", counted)
    with cancel.running(43), pytest.raises(cancel.Cancelled):
        img2embed.run({"image": images * 20}, worker_params("img2embed", batch_size=4))
    assert sizes == [4]


# --- a real worker process -----------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # a real worker process: the handle runs on trio elsewhere
async def test_a_cancelled_large_request_frees_the_worker(minilm_path: Path) -> None:
    """The worker reports the large batch cancelled (not a result), then serves a one-text probe."""
    spec = WorkerSpec(
        "minilm",
        "1.0.0",
        str(minilm_path),
        "txt2embed",
        "modelmora_workers.pipelines.text_embedding:TextEmbedding",
        device="cpu",
    )
    reference = TextEmbedding(str(minilm_path), device="cpu", dtype="auto", options={})
    async with (
        WorkerHandle.open(
            spec,
            instance_id=segments.new_instance_id(),
            request_ring_bytes=8 << 20,
            response_ring_bytes=8 << 20,
            start_timeout_s=120,
            stop_grace_s=5,
            env=worker_env(),
        ) as handle,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(handle.read_loop)
        big = handle.new_batch_id()
        outcome: list[object] = []
        done = anyio.Event()

        async def run_big() -> None:
            try:
                outcome.append(
                    await handle.infer(
                        {"text": texts(2048, 300)}, worker_params("txt2embed", batch_size=32), batch_id=big
                    )
                )
            except ModelUnavailable as exc:
                outcome.append(exc)
            done.set()

        tg.start_soon(run_big)
        while handle.statistics().in_flight_batches == 0:  # noqa: ASYNC110 - the handle has no event for it
            await anyio.sleep(0.01)
        await handle.cancel(big)
        probe = await handle.infer({"text": ["a one-text probe"]}, worker_params("txt2embed", batch_size=32))
        with anyio.fail_after(30):  # a safety net: the worker runs one batch at a time, the big one first
            await done.wait()
        assert isinstance(outcome[0], ModelUnavailable) and "cancelled" in outcome[0].message
        want = reference.run({"text": ["a one-text probe"]}, worker_params("txt2embed", batch_size=32))["embeddings"]
        np.testing.assert_allclose(np.asarray(probe["embeddings"].rows(), dtype=np.float32), want, atol=1e-5)
        tg.cancel_scope.cancel()
