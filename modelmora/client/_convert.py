"""The wire and the client's types: answers to results, a failed call's exception to its
`ClientError` (status, message and trailing metadata)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import numpy as np
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from .._proto.modelmora import v1
from .errors import (
    CallCancelledError,
    ClientError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from .results import (
    GeneratedImage,
    ImageResult,
    ModelInfo,
    ModelSettings,
    ModelState,
    ModelVersion,
    ServerStatus,
    TextResult,
    Timing,
)

__all__ = (
    "embeddings",
    "error_for",
    "finish_reason",
    "from_exception",
    "image_result",
    "infer_result",
    "model_info",
    "model_state",
    "server_status",
    "task_name",
    "text_result",
)


def task_name(task: v1.TaskType | int) -> str:
    """A task type's wire name ("txt2embed"); "unspecified" for one this client does not know."""
    try:
        return str(v1.TaskType(int(task)).name).lower()
    except ValueError:
        return "unspecified"


def finish_reason(reason: v1.FinishReason | int) -> str:
    """ "stop", "length" or "unspecified"."""
    try:
        return str(v1.FinishReason(int(reason)).name).lower()
    except ValueError:
        return "unspecified"


def _timing(message: v1.Timing | None) -> Timing:
    if message is None:
        return Timing()
    return Timing(message.queue_ms, message.inference_ms, message.total_ms)


def text_result(response: v1.InferResponse) -> TextResult:
    texts = response.texts or v1.Texts()
    return TextResult(
        tuple(texts.texts),
        tuple(finish_reason(r) for r in texts.finish_reasons),
        response.model_id,
        response.version,
        _timing(response.timing),
    )


def image_result(response: v1.InferResponse) -> ImageResult:
    images = response.images.images if response.images is not None else []
    return ImageResult(
        tuple(GeneratedImage(i.png, i.url, i.expires_at) for i in images),
        response.model_id,
        response.version,
        _timing(response.timing),
    )


def embeddings(response: v1.InferResponse) -> np.ndarray:
    """An embedding answer's rows: a float32 array of shape (inputs, dim)."""
    e = response.embeddings
    shape = tuple(int(n) for n in e.shape) if e is not None else ()
    if e is None or len(shape) != 2 or len(e.data) != 4 * shape[0] * shape[1]:
        raise error_for(Status.INTERNAL, "the server's answer has no well-formed embeddings")
    return np.frombuffer(e.data, "<f4").astype(np.float32).reshape(shape)


def infer_result(response: v1.InferResponse) -> np.ndarray | TextResult | ImageResult:
    """Any task's answer as its direct call returns it: embeddings, texts or images."""
    if response.embeddings is not None:
        return embeddings(response)
    if response.texts is not None:
        return text_result(response)
    return image_result(response)


def model_info(message: v1.Model) -> ModelInfo:
    s = message.settings or v1.ModelSettings()
    return ModelInfo(
        message.id,
        task_name(message.task_type),
        message.source,
        message.active_version,
        tuple(ModelVersion(v.version, v.revision, v.size_bytes, v.files, v.created_at) for v in message.versions),
        ModelSettings(
            s.max_batch_size, s.max_wait_ms, s.queue_limit, s.device, s.dtype, s.pinned, s.preload, s.keep_alive
        ),
    )


def model_state(message: v1.ModelStatus) -> ModelState:
    worker = message.worker
    return ModelState(
        message.model_id,
        message.version,
        message.task_type,
        message.state,
        message.pinned,
        message.queue_depth,
        message.busy,
        worker.pid if worker is not None else None,
        message.device,
        message.measured_mb,
        message.last_used,
        message.last_error,
        message.failures,
        message.served,
        message,
    )


def server_status(message: v1.ServerStatus) -> ServerStatus:
    sup = message.supervisor or v1.SupervisorStatus()
    budget = message.budget or v1.BudgetStatus()
    return ServerStatus(
        sup.pid,
        sup.rss_mb,
        sup.uptime_s,
        budget.memory_budget_mb,
        budget.used_mb,
        tuple(model_state(m) for m in message.models),
        message,
    )


_CLASSES: dict[Status, type[ClientError]] = {
    Status.INVALID_ARGUMENT: InvalidArgumentError,
    Status.NOT_FOUND: NotFoundError,
    Status.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    Status.UNAVAILABLE: UnavailableError,
    Status.DEADLINE_EXCEEDED: DeadlineExceededError,
    Status.CANCELLED: CallCancelledError,
    Status.UNAUTHENTICATED: UnauthenticatedError,
    Status.PERMISSION_DENIED: PermissionDeniedError,
    Status.INTERNAL: InternalError,
}


def error_for(
    status: Status,
    message: str,
    *,
    code: str | None = None,
    field: str | None = None,
    retry_after_s: float | None = None,
    attempts: int = 1,
) -> ClientError:
    """The `ClientError` subclass for `status`."""
    cls = _CLASSES.get(status, ClientError)
    return cls(status, message, code=code, field=field, retry_after_s=retry_after_s, attempts=attempts)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def from_exception(
    exc: BaseException, trailers: Mapping[str, str | bytes] | None = None, attempts: int = 1
) -> ClientError | None:
    """The `ClientError` for what a grpclib call raised (`trailers`: the call's trailing metadata),
    or None for an exception that is not a call's failure (a bug, to propagate as it is)."""
    if isinstance(exc, ClientError):
        exc.attempts = attempts
        return exc
    if isinstance(exc, GRPCError):
        meta = {k: v if isinstance(v, str) else v.decode("latin-1") for k, v in (trailers or {}).items()}
        return error_for(
            exc.status,
            exc.message or exc.status.name.lower().replace("_", " "),
            code=meta.get("modelmora-error-code"),
            field=meta.get("modelmora-error-field"),
            retry_after_s=_retry_after(meta.get("retry-after")),
            attempts=attempts,
        )
    if isinstance(exc, asyncio.TimeoutError) and getattr(exc, "errno", None) is None:
        # grpclib's own deadline, before the server answered (a connect timeout has an errno)
        return error_for(Status.DEADLINE_EXCEEDED, "the call's deadline passed", attempts=attempts)
    if isinstance(exc, StreamTerminatedError):
        return error_for(Status.UNAVAILABLE, f"the connection was lost: {exc}", attempts=attempts)
    if isinstance(exc, OSError):  # refused, reset, unreachable, name not resolved
        text = exc.strerror or str(exc) or type(exc).__name__
        return error_for(Status.UNAVAILABLE, f"cannot reach the server: {text}", attempts=attempts)
    return None
