"""txt2img: diffusers text-to-image pipelines (Stable Diffusion and the others AutoPipelineForText2Image knows).

One PNG per prompt. Each denoising step checks the cancel flag and emits a "progress" event
({"step": i, "steps": n}; for every item of the batch when one forward pass covers the whole
request, else for the items of the pass). A request with a seed runs its prompts one at a
time, each from a CPU torch.Generator seeded with that seed (the initial noise is then the
same on CPU and GPU), so an image does not depend on its batch-mates.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from .. import cancel, events
from ..devices import load_kwargs, resolve_device
from .base import InputError, param
from .text_generation import texts_input

__all__ = ("TextToImage",)


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _size(params: dict[str, Any], name: str) -> int | None:
    value = param(params, name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 8:
        raise InputError(f"{name} must be a positive multiple of 8", f"$.parameters.{name}")
    return value


_WARMUP_PARAMS: dict[str, Any] = {
    "steps": 1,
    "guidance_scale": 1.0,
    "width": None,
    "height": None,
    "seed": 0,
    "negative_prompt": None,
    "batch_size": 1,
}


class TextToImage:
    """Generates one image per prompt with a diffusers pipeline loaded from a local directory."""

    def __init__(self, path: str, *, device: str, dtype: str, options: dict[str, Any]) -> None:
        from diffusers import AutoPipelineForText2Image

        self.device = resolve_device(device)
        kwargs = load_kwargs(dtype, dtype_key="torch_dtype")
        index = json.loads((Path(path) / "model_index.json").read_text(encoding="utf-8"))
        if "safety_checker" in index:  # a server returns the image; filtering is the application's choice
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        self.pipe = AutoPipelineForText2Image.from_pretrained(path, **kwargs).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    def _generate(
        self, prompts: list[str], first: int, whole: bool, params: dict[str, Any], width: int | None, height: int | None
    ) -> list[bytes]:
        import torch

        steps = int(param(params, "steps"))
        items = [-1] if whole else list(range(first, first + len(prompts)))

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            cancel.check()
            for item in items:
                events.emit("progress", {"step": step + 1, "steps": steps}, item=item)
            return tensors

        seed = param(params, "seed")
        call: dict[str, Any] = {
            "prompt": prompts,
            "num_inference_steps": steps,
            "guidance_scale": float(param(params, "guidance_scale")),
            "width": width,
            "height": height,
            "num_images_per_prompt": 1,
            "output_type": "pil",
            "callback_on_step_end": on_step_end,
        }
        if seed is not None:
            call["generator"] = [torch.Generator("cpu").manual_seed(int(seed)) for _ in prompts]
        negative = param(params, "negative_prompt")
        if negative is not None:
            call["negative_prompt"] = [negative] * len(prompts)
        with torch.inference_mode():
            images = self.pipe(**call).images
        return [_png(image) for image in images]

    def warmup(self) -> None:
        out = self.run({"text": ["warm-up"]}, _WARMUP_PARAMS)
        if len(out["images"]) != 1 or not out["images"][0].startswith(b"\x89PNG\r\n\x1a\n"):
            raise RuntimeError("test inference produced no image")

    def run(self, inputs: dict[str, Any], params: dict[str, Any]) -> dict[str, list[bytes]]:
        prompts = texts_input(inputs)
        width, height = _size(params, "width"), _size(params, "height")
        size = 1 if param(params, "seed") is not None else max(1, int(param(params, "batch_size")))
        images: list[bytes] = []
        for start in range(0, len(prompts), size):
            cancel.check()
            chunk = prompts[start : start + size]
            images += self._generate(chunk, start, len(chunk) == len(prompts), params, width, height)
        return {"images": images}
