"""Typed results of the core: what a front end encodes for its protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..lifecycle import TensorData
from ..tasks import TaskType

__all__ = ("Embeddings", "GeneratedImage", "Images", "InferResult", "Output", "StreamEvent", "Texts", "Timing")


@dataclass(frozen=True, slots=True)
class Embeddings:
    """One row per input: float32, shape (inputs, dim)."""

    vectors: TensorData

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]


@dataclass(frozen=True, slots=True)
class Texts:
    """One text per input, and why its generation ended: "stop" or "length"; for generated texts
    (txt2txt) also the tokens of each prompt and of each completion."""

    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: list[int] | None = None
    completion_tokens: list[int] | None = None


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """A generated PNG: in `png` (inline), or stored at `url` until `expires_at` (unix time).

    A stored image's `url` may be relative to the server ("/api/v1/results/..."): the front end
    makes it absolute for its clients."""

    png: bytes | None = None
    url: str | None = None
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Images:
    """One image per prompt."""

    images: list[GeneratedImage]


Output = Embeddings | Texts | Images


@dataclass(frozen=True, slots=True)
class Timing:
    queue_ms: float
    inference_ms: float
    total_ms: float


@dataclass(frozen=True, slots=True)
class InferResult:
    """A finished inference."""

    model_id: str
    version: str
    task: TaskType
    output: Output
    timing: Timing


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """An event while a request runs: "token" ({"index", "text"}) or "progress" ({"step", "steps"})."""

    kind: str
    data: dict[str, Any]
