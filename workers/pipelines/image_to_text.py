"""img2txt: image captioning (BLIP; VisionEncoderDecoder models such as ViT + GPT-2) with `.generate()`.

Greedy decoding at temperature 0, sampling above. A request with a seed runs its images one
at a time, after seeding torch's generator with that seed, so a caption does not depend on
its batch-mates. The cancel flag is checked after every generated token.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from .. import cancel
from ..devices import for_inference, load_kwargs, resolve_device
from .base import param
from .image_embedding import images_input, warmup_images

__all__ = ("ImageToText",)


def _stopping_criteria() -> Any:
    """A StoppingCriteriaList that checks the cancel flag at every step (and never stops by itself)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class CancelCheck(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            cancel.check()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]

    return StoppingCriteriaList([CancelCheck()])


def _ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list | tuple):
        return {v for v in value if isinstance(v, int)}
    return set()


class ImageToText:
    """Generates a caption per image with an AutoModelForImageTextToText model that needs no prompt."""

    def __init__(self, path: str, *, device: str, dtype: str, options: dict[str, Any]) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        self.device = resolve_device(device)
        kwargs = load_kwargs(dtype)
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = for_inference(AutoModelForImageTextToText.from_pretrained(path, **kwargs), self.device)
        self.dtype = next(self.model.parameters()).dtype
        config = self.model.config
        text_config = getattr(config, "text_config", None) or getattr(config, "decoder", None) or config
        if config.model_type == "blip":  # BLIP's generate() ends captions at [SEP]
            self.eos_ids = _ids(text_config.sep_token_id)
        else:
            self.eos_ids = _ids(self.model.generation_config.eos_token_id) | _ids(self.tokenizer.eos_token_id)
        positions = getattr(text_config, "max_position_embeddings", None)
        # the decoder starts from one token, so it can add at most positions - 1
        self.max_new_limit = int(positions) - 1 if isinstance(positions, int) and positions > 1 else None

    def _caption(self, images: list[np.ndarray], max_tokens: int, temperature: float) -> list[tuple[str, str]]:
        import torch

        pixels = self.processor(images=images, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
        sampling = temperature > 0
        with torch.inference_mode():
            sequences = self.model.generate(
                pixel_values=pixels.to(self.device, self.dtype),
                max_new_tokens=max_tokens,
                num_beams=1,
                do_sample=sampling,
                temperature=temperature if sampling else None,
                stopping_criteria=_stopping_criteria(),
            )
        results = []
        for row in sequences[:, 1:].tolist():  # the first token is the decoder's start token
            end = next((k for k, token in enumerate(row) if token in self.eos_ids), None)
            tokens = row if end is None else row[:end]
            text = cast(str, self.tokenizer.decode(tokens, skip_special_tokens=True)).strip()  # one sequence: one str
            results.append((text, "length" if end is None else "stop"))
        return results

    def warmup(self) -> None:
        out = self.run({"image": warmup_images()}, {"max_tokens": 3, "temperature": 0.0, "seed": None, "batch_size": 2})
        if len(out["texts"]) != 2 or any(r not in ("stop", "length") for r in out["finish_reasons"]):
            raise RuntimeError("test inference produced no captions")

    def run(self, inputs: dict[str, Any], params: dict[str, Any]) -> dict[str, list[str]]:
        import torch

        images = images_input(inputs)
        max_tokens = int(param(params, "max_tokens"))
        if self.max_new_limit is not None:
            max_tokens = min(max_tokens, self.max_new_limit)
        if max_tokens <= 0:
            return {"texts": [""] * len(images), "finish_reasons": ["length"] * len(images)}
        temperature = float(param(params, "temperature"))
        seed = param(params, "seed")
        size = 1 if seed is not None else max(1, int(param(params, "batch_size")))
        results: list[tuple[str, str]] = []
        for start in range(0, len(images), size):
            cancel.check()
            if seed is not None:
                torch.manual_seed(int(seed))
            results += self._caption(images[start : start + size], max_tokens, temperature)
        return {"texts": [text for text, _ in results], "finish_reasons": [reason for _, reason in results]}
