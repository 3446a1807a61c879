"""txt2img on a tiny Stable Diffusion, in process."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from modelmora_workers import cancel, events
from modelmora_workers.pipelines.base import InputError
from modelmora_workers.pipelines.text_to_image import TextToImage

from .params import worker_params

PROMPTS = ["a red cat", "an astronaut riding a horse on the moon", "a house"]


def params(**overrides: Any) -> dict[str, Any]:
    return worker_params("txt2img", **{"steps": 2, "batch_size": 4, **overrides})


def pixels(png: bytes) -> np.ndarray:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def test_one_png_per_prompt_at_the_default_and_requested_sizes(txt2img: TextToImage) -> None:
    out = txt2img.run({"text": PROMPTS}, params())
    assert list(out) == ["images"]
    assert len(out["images"]) == 3
    assert all(isinstance(png, bytes) and pixels(png).shape == (32, 32, 3) for png in out["images"])
    sized = txt2img.run({"text": PROMPTS[:1]}, params(width=48, height=24))
    assert pixels(sized["images"][0]).shape == (24, 48, 3)


def test_seeded_image_is_reproducible_and_independent_of_batch_mates(txt2img: TextToImage) -> None:
    p = params(seed=1234)
    alone = txt2img.run({"text": [PROMPTS[1]]}, p)["images"][0]
    assert txt2img.run({"text": [PROMPTS[1]]}, p)["images"][0] == alone
    in_batch = txt2img.run({"text": [PROMPTS[0], PROMPTS[1], PROMPTS[2]]}, p)["images"]
    assert in_batch[1] == alone
    assert in_batch[0] != alone
    assert txt2img.run({"text": [PROMPTS[1]]}, {**p, "seed": 99})["images"][0] != alone
    negative = txt2img.run({"text": [PROMPTS[1]]}, {**p, "negative_prompt": "blurry, dark"})["images"][0]
    assert negative != alone


def test_small_batch_size_keeps_all_images(txt2img: TextToImage) -> None:
    out = txt2img.run({"text": PROMPTS}, params(batch_size=2, steps=1))
    assert [pixels(png).shape for png in out["images"]] == [(32, 32, 3)] * 3


def test_progress_events_per_step(txt2img: TextToImage) -> None:
    received: list[tuple[int, str, dict[str, Any]]] = []
    with events.sink(lambda item, kind, data: received.append((item, kind, data))):
        txt2img.run({"text": PROMPTS[:2]}, params(steps=3))
    assert received == [(-1, "progress", {"step": s, "steps": 3}) for s in (1, 2, 3)]

    received.clear()  # one pass per seeded prompt: the events name the items of each pass
    with events.sink(lambda item, kind, data: received.append((item, kind, data))):
        txt2img.run({"text": PROMPTS[:2]}, params(steps=2, seed=5))
    assert received == [(i, "progress", {"step": s, "steps": 2}) for i in (0, 1) for s in (1, 2)]


def test_cancel_before_and_between_steps(txt2img: TextToImage) -> None:
    with cancel.running(7), pytest.raises(cancel.Cancelled):
        cancel.request(7)
        txt2img.run({"text": PROMPTS[:1]}, params())

    steps: list[int] = []

    def cancel_after_first_step(item: int, kind: str, data: dict[str, Any]) -> None:
        steps.append(data["step"])
        cancel.request(8)

    with cancel.running(8), events.sink(cancel_after_first_step), pytest.raises(cancel.Cancelled):
        txt2img.run({"text": PROMPTS[:1]}, params(steps=10))
    assert steps == [1]


@pytest.mark.parametrize(
    ("overrides", "inputs", "field"),
    [
        ({"width": 30}, None, "$.parameters.width"),
        ({"height": 20}, None, "$.parameters.height"),
        ({"width": 0}, None, "$.parameters.width"),
        ({}, {"text": []}, "$.input_data.text"),
        ({}, {"text": ["ok", None]}, "$.input_data.text[1]"),
    ],
)
def test_bad_inputs_are_input_errors(
    txt2img: TextToImage, overrides: dict[str, Any], inputs: dict[str, Any] | None, field: str
) -> None:
    with pytest.raises(InputError) as info:
        txt2img.run(inputs or {"text": PROMPTS[:1]}, params(**overrides))
    assert info.value.field == field
