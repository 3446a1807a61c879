"""The ModelMoraError tree: one class per failure mode, each with its HTTP status, its gRPC
status and code.

Errors are translated to responses in one place per protocol (`api.rest`, `api.grpc`); internal
exception text never reaches a client.
"""

from __future__ import annotations

import enum

__all__ = (
    "ChecksumMismatch",
    "ClientGone",
    "ConcurrencyLimited",
    "DeadlineExceeded",
    "Forbidden",
    "GrpcStatus",
    "ImageBudgetExhausted",
    "InsufficientMemory",
    "InvalidInput",
    "MalformedRequest",
    "ModelLoadFailed",
    "ModelMoraError",
    "IdempotencyConflict",
    "JobNotFinished",
    "JobNotFound",
    "ModelNotFound",
    "ModelUnavailable",
    "OperationNotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "QueueFull",
    "RateLimited",
    "RegistryError",
    "RequestTimeout",
    "SharedMemoryFull",
    "SourceError",
    "StorageUnavailable",
    "Unauthenticated",
    "UnsupportedMediaType",
    "WorkerCrashed",
    "WorkerError",
)


class GrpcStatus(enum.IntEnum):
    """The gRPC status codes our errors map to (the standard numbers; the gRPC edge turns them into
    its library's own enum)."""

    CANCELLED = 1
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class ModelMoraError(Exception):
    """Base of every expected error. `code` is the stable machine-readable name."""

    http_status = 500
    grpc_status = GrpcStatus.INTERNAL
    code = "internal_error"

    def __init__(self, message: str, *, field: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, field={self.field!r})"


class MalformedRequest(ModelMoraError):
    """The body is not valid JSON, not UTF-8, or nested too deep (raised by the API decoders)."""

    http_status = 400
    grpc_status = GrpcStatus.INVALID_ARGUMENT
    code = "malformed_request"


class RequestTimeout(ModelMoraError):
    """The request body did not arrive within `body_read_timeout_s` (the connection is closed)."""

    http_status = 408
    grpc_status = GrpcStatus.DEADLINE_EXCEEDED
    code = "request_timeout"


class UnsupportedMediaType(ModelMoraError):
    """A request body that is not declared `application/json` (`Content-Type`)."""

    http_status = 415
    grpc_status = GrpcStatus.INVALID_ARGUMENT
    code = "unsupported_media_type"


class ModelNotFound(ModelMoraError):
    """No such model or version in the registry."""

    http_status = 404
    grpc_status = GrpcStatus.NOT_FOUND
    code = "model_not_found"


class OperationNotFound(ModelMoraError):
    """No background operation with that id (or it ended too long ago to be kept)."""

    http_status = 404
    grpc_status = GrpcStatus.NOT_FOUND
    code = "operation_not_found"


class InvalidInput(ModelMoraError):
    """Valid JSON but a field is wrong for the model's task; `field` names it."""

    http_status = 422
    grpc_status = GrpcStatus.INVALID_ARGUMENT
    code = "invalid_input"


class PayloadTooLarge(ModelMoraError):
    """The body (or an image) is over its configured limit."""

    http_status = 413
    grpc_status = GrpcStatus.INVALID_ARGUMENT
    code = "payload_too_large"


class Forbidden(ModelMoraError):
    """A signed result URL whose signature is wrong or whose time has passed."""

    http_status = 403
    grpc_status = GrpcStatus.PERMISSION_DENIED
    code = "forbidden"


class QueueFull(ModelMoraError):
    """The model's queue is at its limit: refused at once, retry later."""

    http_status = 429
    grpc_status = GrpcStatus.RESOURCE_EXHAUSTED
    code = "queue_full"


class WorkerCrashed(ModelMoraError):
    """The worker process died while holding the request."""

    http_status = 503
    grpc_status = GrpcStatus.UNAVAILABLE
    code = "worker_crashed"


class WorkerError(ModelMoraError):
    """The worker reported that a batch failed inside its pipeline (not a crash)."""

    http_status = 500
    grpc_status = GrpcStatus.INTERNAL
    code = "inference_failed"


class ModelLoadFailed(ModelMoraError):
    """Starting the worker, loading the weights or the test inference failed."""

    http_status = 503
    grpc_status = GrpcStatus.UNAVAILABLE
    code = "model_load_failed"


class ChecksumMismatch(ModelLoadFailed):
    """A model file's SHA-256 differs from the one recorded at install, or the file is missing
    (raised before a load, refusing it, and before an activation, refusing it: 409); `file` names
    the file, relative to the version's folder."""

    http_status = 409
    grpc_status = GrpcStatus.FAILED_PRECONDITION
    code = "checksum_mismatch"

    def __init__(self, message: str, *, file: str, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.file = file


class ModelUnavailable(ModelMoraError):
    """The model cannot serve now (unloaded while queued, shutting down, no memory)."""

    http_status = 503
    grpc_status = GrpcStatus.UNAVAILABLE
    code = "model_unavailable"


class InsufficientMemory(ModelMoraError):
    """No room in the memory budget for the model's worker before the request's deadline."""

    http_status = 503
    grpc_status = GrpcStatus.UNAVAILABLE
    code = "insufficient_memory"


class SharedMemoryFull(ModelMoraError):
    """/dev/shm has no room for a request's payload segment (raised by the worker handle, from
    `ipc.segments.SharedMemoryExhausted`); the worker and the server keep serving."""

    http_status = 503
    grpc_status = GrpcStatus.UNAVAILABLE
    code = "shared_memory_exhausted"


class ImageBudgetExhausted(ModelMoraError):
    """No room for the request's decoded pixels in the server-wide image budget before its deadline
    (`max_decoded_pixels_in_flight`): other requests' images are being decoded or served."""

    http_status = 503
    grpc_status = GrpcStatus.UNAVAILABLE
    code = "image_budget_exhausted"


class DeadlineExceeded(ModelMoraError):
    """The request's deadline passed before its result was ready."""

    http_status = 504
    grpc_status = GrpcStatus.DEADLINE_EXCEEDED
    code = "deadline_exceeded"


class SourceError(ModelMoraError):
    """A model source (e.g. the Hugging Face hub) could not be reached or refused access."""

    http_status = 502
    grpc_status = GrpcStatus.UNAVAILABLE
    code = "source_error"


class RegistryError(ModelMoraError):
    """An install/uninstall/registry operation was refused (duplicate id, bad source...)."""

    http_status = 409
    grpc_status = GrpcStatus.FAILED_PRECONDITION
    code = "registry_conflict"


class ClientGone(ModelMoraError):
    """The caller went away before its request finished (REST: the client disconnected); nobody
    reads the answer, it is only logged."""

    http_status = 499
    grpc_status = GrpcStatus.CANCELLED
    code = "client_closed_request"


class StorageUnavailable(ModelMoraError):
    """The registry (or another store) cannot be read or written now (read-only, full, unreachable)."""

    http_status = 503
    grpc_status = GrpcStatus.UNAVAILABLE
    code = "storage_unavailable"


class Unauthenticated(ModelMoraError):
    """No credentials, or credentials the server does not know (raised by the edge's gate,
    `modelmora.security.Gate`, before any body is read). `challenge` is the `WWW-Authenticate`
    value REST answers with."""

    http_status = 401
    grpc_status = GrpcStatus.UNAUTHENTICATED
    code = "unauthenticated"

    def __init__(self, message: str, *, challenge: str) -> None:
        super().__init__(message)
        self.challenge = challenge


class PermissionDenied(ModelMoraError):
    """A known token without the scope the endpoint or method needs (raised by the edge's gate)."""

    http_status = 403
    grpc_status = GrpcStatus.PERMISSION_DENIED
    code = "permission_denied"

    def __init__(self, message: str, *, challenge: str) -> None:
        super().__init__(message)
        self.challenge = challenge


class RateLimited(ModelMoraError):
    """The token sent requests faster than `[auth] rate_limit_per_s` allows (its burst is spent);
    `retry_after_s` says when the next one would pass."""

    http_status = 429
    grpc_status = GrpcStatus.RESOURCE_EXHAUSTED
    code = "rate_limited"


class ConcurrencyLimited(ModelMoraError):
    """The token already has `[auth] max_concurrent_requests` requests running."""

    http_status = 429
    grpc_status = GrpcStatus.RESOURCE_EXHAUSTED
    code = "too_many_concurrent_requests"


class JobNotFound(ModelMoraError):
    """No async job has this id (never created, or swept after `job_ttl_s`); raised by the jobs API."""

    http_status = 404
    grpc_status = GrpcStatus.NOT_FOUND
    code = "job_not_found"


class JobNotFinished(ModelMoraError):
    """The result of an async job that is not completed was asked for; `status` is the job's state."""

    http_status = 409
    grpc_status = GrpcStatus.FAILED_PRECONDITION
    code = "job_not_finished"

    def __init__(self, message: str, *, status: str) -> None:
        super().__init__(message)
        self.status = status


class IdempotencyConflict(ModelMoraError):
    """An `Idempotency-Key` already names a job with another model or request (raised at submit)."""

    http_status = 409
    grpc_status = GrpcStatus.FAILED_PRECONDITION
    code = "idempotency_conflict"
