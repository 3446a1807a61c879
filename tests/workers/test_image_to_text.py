"""img2txt on a tiny BLIP, in process."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from modelmora_workers import cancel
from modelmora_workers.pipelines.base import InputError
from modelmora_workers.pipelines.image_to_text import ImageToText

from .params import worker_params


def params(**overrides: Any) -> dict[str, Any]:
    return worker_params("img2txt", **{"max_tokens": 8, "temperature": 0.0, **overrides})


def test_one_caption_and_reason_per_image(img2txt: ImageToText, images: list[np.ndarray]) -> None:
    out = img2txt.run({"image": images[:3]}, params())
    assert set(out) == {"texts", "finish_reasons"}
    assert len(out["texts"]) == len(out["finish_reasons"]) == 3
    assert all(isinstance(t, str) and t for t in out["texts"])
    assert out["finish_reasons"] == ["length"] * 3  # a random model does not pick [SEP] greedily here


def test_greedy_batch_equals_each_alone_and_small_batches_keep_order(
    img2txt: ImageToText, images: list[np.ndarray]
) -> None:
    alone = [img2txt.run({"image": [im]}, params())["texts"][0] for im in images]
    assert img2txt.run({"image": images}, params())["texts"] == alone
    assert img2txt.run({"image": images}, params(batch_size=2))["texts"] == alone


def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates(
    img2txt: ImageToText, images: list[np.ndarray]
) -> None:
    p = params(temperature=1.0, seed=123, max_tokens=12)
    alone = img2txt.run({"image": [images[2]]}, p)
    assert img2txt.run({"image": [images[2]]}, p) == alone
    in_batch = img2txt.run({"image": [images[0], images[2], images[4]]}, p)
    assert in_batch["texts"][1] == alone["texts"][0]
    assert len({img2txt.run({"image": [images[2]]}, {**p, "seed": s})["texts"][0] for s in range(3)}) > 1


def test_end_of_sequence_finishes_with_stop(img2txt: ImageToText, images: list[np.ndarray], monkeypatch: Any) -> None:
    monkeypatch.setattr(img2txt, "eos_ids", set(range(len(img2txt.tokenizer))))  # the first token ends it
    assert img2txt.run({"image": images[:2]}, params()) == {"texts": ["", ""], "finish_reasons": ["stop", "stop"]}


def test_max_tokens_is_capped_by_the_decoder_positions(img2txt: ImageToText, images: list[np.ndarray]) -> None:
    out = img2txt.run({"image": images[:1]}, params(max_tokens=1000, temperature=1.0, seed=1))
    assert out["finish_reasons"] in (["length"], ["stop"])


def test_cancel(img2txt: ImageToText, images: list[np.ndarray]) -> None:
    with cancel.running(7), pytest.raises(cancel.Cancelled):
        cancel.request(7)
        img2txt.run({"image": images[:2]}, params())


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({"image": []}, "$.input_data.image"),
        ({"text": ["a"]}, "$.input_data.image"),
        ({"image": [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.int16)]}, "$.input_data.image[1]"),
    ],
)
def test_bad_images_are_input_errors(img2txt: ImageToText, inputs: dict[str, Any], field: str) -> None:
    with pytest.raises(InputError) as info:
        img2txt.run(inputs, params())
    assert info.value.field == field
