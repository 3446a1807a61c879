"""img2embed: image embeddings from CLIP-style models (transformers, `get_image_features`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..devices import load_kwargs, resolve_device
from .base import InputError, param, sub_batches

__all__ = ("ImageEmbedding", "images_input", "warmup_images")


def images_input(inputs: dict[str, Any]) -> list[np.ndarray]:
    """The "image" input, checked: a non-empty list of uint8 (height, width, 3) RGB arrays."""
    images = inputs.get("image")
    if not isinstance(images, list) or not images:
        raise InputError("this task needs 'image': an image or a non-empty list of images", "$.input_data.image")
    for i, image in enumerate(images):
        if not (
            isinstance(image, np.ndarray)
            and image.dtype == np.uint8
            and image.ndim == 3
            and image.shape[2] == 3
            and image.shape[0] > 0
            and image.shape[1] > 0
        ):
            raise InputError("each image must be decoded to 8-bit RGB (height, width, 3)", f"$.input_data.image[{i}]")
    return images


def warmup_images() -> list[np.ndarray]:
    """Two small test images of different sizes (a gradient and a flat colour)."""
    ramp = np.linspace(0, 255, 48, dtype=np.float32).astype(np.uint8)
    gradient = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[None, ::-1]), axis=-1)
    return [np.ascontiguousarray(gradient), np.full((24, 40, 3), 200, dtype=np.uint8)]


class ImageEmbedding:
    """Encodes images into float32 row vectors with a CLIP-like model (CLIPModel, SiglipModel, ...).

    The model directory holds config.json, the weights and the image processor config
    (preprocessor_config.json or processor_config.json). Rows are the model's projected image
    features; `normalize` scales each row to unit L2 norm.
    """

    def __init__(self, path: str, *, device: str, dtype: str, options: dict[str, Any]) -> None:
        from transformers import AutoImageProcessor, AutoModel

        self.device = resolve_device(device)
        kwargs = load_kwargs(dtype)
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, **kwargs).to(self.device).eval()
        if not hasattr(self.model, "get_image_features"):
            raise RuntimeError(f"{type(self.model).__name__} has no image features (not a CLIP-like model)")
        self.dtype = next(self.model.parameters()).dtype
        self.dim = 0

    def _embed(self, images: list[np.ndarray]) -> np.ndarray:
        import torch

        pixels = self.processor(images=images, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
        with torch.inference_mode():
            out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
            if not isinstance(out, torch.Tensor):  # transformers 5 may return a model output
                out = out.pooler_output
            embeddings: np.ndarray = out.float().cpu().numpy()
            return embeddings

    def warmup(self) -> None:
        out = self.run({"image": warmup_images()}, {"normalize": False, "batch_size": 2})["embeddings"]
        if out.ndim != 2 or out.shape[0] != 2 or out.shape[1] == 0 or not np.all(np.isfinite(out)):
            raise RuntimeError(f"test inference produced no finite embeddings (shape {out.shape})")
        self.dim = int(out.shape[1])

    def run(self, inputs: dict[str, Any], params: dict[str, Any]) -> dict[str, np.ndarray]:
        images = images_input(inputs)
        size = max(1, int(param(params, "batch_size")))
        rows = [self._embed(images[part]) for part in sub_batches(len(images), size)]  # checks the cancel flag
        out = np.concatenate(rows, axis=0).astype(np.float32, copy=False)
        if param(params, "normalize"):
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = out / np.maximum(norms, 1e-12)
        return {"embeddings": np.ascontiguousarray(out, dtype=np.float32)}
