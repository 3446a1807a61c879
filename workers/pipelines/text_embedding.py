"""txt2embed: sentence-transformers models.

A batch of at most "batch_size" texts is one `encode` call (one forward pass). A larger one (a
request larger than the model's max_batch_size runs alone) is sorted by length, as `encode` sorts
it, and run one forward pass at a time through `sub_batches`, so that a cancelled request stops
within one forward pass instead of holding the worker until the last text.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .. import cancel
from ..devices import resolve_device, torch_dtype
from .base import InputError, param, sub_batches

__all__ = ("TextEmbedding",)


class TextEmbedding:
    """Encodes a batch of texts into float32 row vectors with SentenceTransformer."""

    concurrent = True
    """Batches may run on several inference streams (threads) at once."""

    def __init__(self, path: str, *, device: str, dtype: str, options: dict[str, Any]) -> None:
        from sentence_transformers import SentenceTransformer

        self.device = resolve_device(device)
        kwargs: dict[str, Any] = {}
        td = torch_dtype(dtype)
        if td is not None:
            kwargs["model_kwargs"] = {"dtype": td}
        self.model = SentenceTransformer(path, device=self.device, local_files_only=True, **kwargs)
        self._serialise_tokenizer()
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim() or 0)

    def _serialise_tokenizer(self) -> None:
        """One tokenization at a time, as a guard: a fast tokenizer fails ("Already borrowed") when a
        call that changes its truncation or padding meets another call. Ours all pass the same
        settings, and two threads ran without it here. The forward passes of two streams still
        overlap each other and the other stream's tokenization."""
        preprocess = self.model.preprocess
        lock = threading.Lock()

        def locked(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return preprocess(*args, **kwargs)

        self.model.preprocess = locked  # type: ignore[method-assign]  # this instance's own, on purpose

    def warmup(self) -> None:
        out = self.model.encode(["warm-up"], convert_to_numpy=True)
        if out.shape[0] != 1 or not np.all(np.isfinite(out)):
            raise RuntimeError("test inference produced no finite embedding")

    def run(self, inputs: dict[str, Any], params: dict[str, Any]) -> dict[str, np.ndarray]:
        texts = inputs.get("text")
        if not isinstance(texts, list):
            raise InputError("txt2embed needs 'text'", "$.input_data.text")
        size = max(1, int(param(params, "batch_size")))
        normalize = bool(param(params, "normalize"))
        if len(texts) <= size:
            cancel.check()
            out = self._encode(texts, size, normalize)
        else:
            out = self._encode_in_sub_batches(texts, size, normalize)
        return {"embeddings": np.ascontiguousarray(out, dtype=np.float32)}

    def _encode(self, texts: list[str], size: int, normalize: bool) -> np.ndarray:
        out = self.model.encode(texts, batch_size=size, normalize_embeddings=normalize, convert_to_numpy=True)
        return np.asarray(out, dtype=np.float32)

    def _encode_in_sub_batches(self, texts: list[str], size: int, normalize: bool) -> np.ndarray:
        """Longest texts first (as `encode` orders them: little padding per pass), one pass per sub-batch,
        rows put back in input order."""
        order = np.argsort([-len(text) for text in texts], kind="stable")
        rows = [
            self._encode([texts[i] for i in order[part]], size, normalize) for part in sub_batches(len(texts), size)
        ]
        sorted_rows = np.concatenate(rows, axis=0)
        out = np.empty_like(sorted_rows)
        out[order] = sorted_rows
        return out
