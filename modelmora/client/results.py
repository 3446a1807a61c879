"""What the client's calls return: small frozen dataclasses built from the gRPC messages.

Task types and finish reasons are the wire names REST uses ("txt2embed", "stop"). The status
classes keep the whole message in `raw` (not compared, not shown) for the fields they leave out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._proto.modelmora import v1

__all__ = (
    "DeletedModel",
    "GeneratedImage",
    "ImageResult",
    "ModelInfo",
    "ModelSettings",
    "ModelState",
    "ModelVersion",
    "Progress",
    "ServerStatus",
    "TextResult",
    "Timing",
    "Token",
)


@dataclass(frozen=True, slots=True)
class Timing:
    """Where a request's time went on the server, in ms: waiting for a batch, its batch from
    dispatch to result, and the whole request."""

    queue_ms: float = 0.0
    inference_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class TextResult:
    """Generated texts (txt2txt) or captions (img2txt): one per input, in order."""

    texts: tuple[str, ...]
    finish_reasons: tuple[str, ...]
    model_id: str
    version: str
    timing: Timing

    @property
    def text(self) -> str:
        """The first (for a single prompt or image: the only) text."""
        return self.texts[0]


@dataclass(frozen=True, slots=True)
class Token:
    """New text of input `index` while it is generated; an input's tokens joined are its text."""

    index: int
    text: str


@dataclass(frozen=True, slots=True)
class Progress:
    """A denoising step of prompt `index` finished (txt2img)."""

    index: int
    step: int
    steps: int


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """One generated image: its PNG bytes, or a URL (signed, valid until `expires_at`, unix time)."""

    png: bytes | None = None
    url: str | None = None
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class ImageResult:
    """Generated images, one per prompt."""

    images: tuple[GeneratedImage, ...]
    model_id: str
    version: str
    timing: Timing


@dataclass(frozen=True, slots=True)
class ModelVersion:
    version: str
    revision: str
    size_bytes: int
    files: int
    created_at: float


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """A model's own settings; None: the server's default."""

    max_batch_size: int | None = None
    max_wait_ms: float | None = None
    queue_limit: int | None = None
    device: str | None = None
    dtype: str | None = None
    pinned: bool | None = None
    preload: bool | None = None
    keep_alive: str | None = None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """An installed model (the registry)."""

    id: str
    task_type: str
    source: str
    active_version: str
    versions: tuple[ModelVersion, ...]
    settings: ModelSettings


@dataclass(frozen=True, slots=True)
class DeletedModel:
    """A model removed from the registry, with the versions whose files were deleted."""

    model_id: str
    versions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModelState:
    """A model version at run time: its state (registered, cached, loading, warming, ready,
    unloading, failed...), its worker and its counters. `raw` has every field the server sent."""

    model_id: str
    version: str
    task_type: str
    state: str
    pinned: bool
    queue_depth: int
    busy: bool
    worker_pid: int | None
    device: str | None
    measured_mb: float | None
    last_used: float | None
    last_error: str | None
    failures: int
    served: int
    raw: v1.ModelStatus = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """The server's runtime (what REST's /api/v1/status reports): the supervisor, the memory
    budget in MiB (None: unlimited) and every model version's state. `raw` has every field."""

    supervisor_pid: int
    supervisor_rss_mb: float
    uptime_s: float
    memory_budget_mb: float | None
    memory_used_mb: float
    models: tuple[ModelState, ...]
    raw: v1.ServerStatus = field(repr=False, compare=False)
