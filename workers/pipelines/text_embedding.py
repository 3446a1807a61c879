"""txt2embed: sentence-transformers models."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ..devices import resolve_device, torch_dtype
from .base import InputError

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

        self.model.preprocess = locked

    def warmup(self) -> None:
        out = self.model.encode(["warm-up"], convert_to_numpy=True)
        if out.shape[0] != 1 or not np.all(np.isfinite(out)):
            raise RuntimeError("test inference produced no finite embedding")

    def run(self, inputs: dict[str, Any], params: dict[str, Any]) -> dict[str, np.ndarray]:
        texts = inputs.get("text")
        if not isinstance(texts, list):
            raise InputError("txt2embed needs 'text'", "$.input_data.text")
        out = self.model.encode(
            texts,
            batch_size=int(params.get("batch_size", 32)),
            normalize_embeddings=bool(params.get("normalize", False)),
            convert_to_numpy=True,
        )
        return {"embeddings": np.ascontiguousarray(out, dtype=np.float32)}
