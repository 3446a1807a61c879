"""Baseline for bench_images.py: the img2embed pipeline fed PNG bytes that it decodes itself.

The server's path decodes images in the supervisor and passes raw RGB arrays through shared
memory; this peer receives the encoded bytes instead ("png": list of bytes) and decodes them
in the worker with Pillow before the same model call.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from modelmora_workers.pipelines.image_embedding import ImageEmbedding


class PngImageEmbedding(ImageEmbedding):
    def run(self, inputs: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        if "png" in inputs:
            inputs = {"image": [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in inputs["png"]]}
        return super().run(inputs, params)
