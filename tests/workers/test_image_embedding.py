"""img2embed on a tiny CLIP, in process."""

from __future__ import annotations

import numpy as np
import pytest

from modelmora_workers.pipelines.base import InputError
from modelmora_workers.pipelines.image_embedding import ImageEmbedding

from .params import worker_params


def test_one_float32_row_per_image(img2embed: ImageEmbedding, images: list[np.ndarray]) -> None:
    out = img2embed.run({"image": images[:3]}, worker_params("img2embed", batch_size=32))
    assert list(out) == ["embeddings"]
    emb = out["embeddings"]
    assert isinstance(emb, np.ndarray)
    assert emb.shape == (3, 16) == (3, img2embed.dim)
    assert emb.dtype == np.float32
    assert emb.flags.c_contiguous
    assert np.all(np.isfinite(emb))
    assert not np.allclose(emb[0], emb[1])


def test_normalize_gives_unit_rows(img2embed: ImageEmbedding, images: list[np.ndarray]) -> None:
    raw = img2embed.run({"image": images}, worker_params("img2embed", batch_size=8))["embeddings"]
    unit = img2embed.run({"image": images}, worker_params("img2embed", normalize=True, batch_size=8))["embeddings"]
    assert unit.dtype == np.float32
    assert unit.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)


def test_small_batch_size_keeps_all_rows_in_order(img2embed: ImageEmbedding, images: list[np.ndarray]) -> None:
    two = worker_params("img2embed", batch_size=2)
    batched = img2embed.run({"image": images}, two)["embeddings"]
    alone = np.concatenate([img2embed.run({"image": [im]}, two)["embeddings"] for im in images])
    assert batched.shape == (len(images), 16)
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_images_are_not_kept(img2embed: ImageEmbedding, images: list[np.ndarray]) -> None:
    """Inputs are views over shared memory that the next batch overwrites: a result must not change
    when the buffer does, and the next batch in the same buffer gets its own result."""
    first, second = images[0], 255 - images[0]
    one = worker_params("img2embed", batch_size=1)
    want_first = img2embed.run({"image": [first.copy()]}, one)["embeddings"].copy()
    want_second = img2embed.run({"image": [second.copy()]}, one)["embeddings"].copy()
    assert not np.allclose(want_first, want_second)
    segment = bytearray(first.tobytes())  # as in the worker: one buffer, reused batch after batch
    view = np.frombuffer(segment, dtype=np.uint8).reshape(first.shape)
    out = img2embed.run({"image": [view]}, one)["embeddings"]
    segment[:] = second.tobytes()
    np.testing.assert_array_equal(out, want_first)
    np.testing.assert_array_equal(img2embed.run({"image": [view]}, one)["embeddings"], want_second)


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({}, "$.input_data.image"),
        ({"image": []}, "$.input_data.image"),
        ({"image": ["not an image"]}, "$.input_data.image[0]"),
        ({"image": [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)]}, "$.input_data.image[1]"),
        ({"image": [np.zeros((8, 8, 4), np.uint8)]}, "$.input_data.image[0]"),
        ({"image": [np.zeros((8, 8, 3), np.float32)]}, "$.input_data.image[0]"),
        ({"image": [np.zeros((0, 8, 3), np.uint8)]}, "$.input_data.image[0]"),
    ],
)
def test_bad_images_are_input_errors(img2embed: ImageEmbedding, inputs: dict[str, object], field: str) -> None:
    with pytest.raises(InputError) as info:
        img2embed.run(inputs, worker_params("img2embed", batch_size=4))
    assert info.value.field == field
