"""The one error family of the client: every failed call raises a `ClientError` carrying the gRPC
status, the server's message, its error code and field (trailing metadata `modelmora-error-code`,
`modelmora-error-field`), `retry-after`, and how many attempts were made.

A subclass per status a caller handles differently (`NotFoundError`, `UnavailableError`...);
`InvalidArgumentError` is also a `ValueError` and `DeadlineExceededError` a `TimeoutError`, so code
that catches those builtins keeps working. Arguments the client refuses before sending anything
raise `InvalidArgumentError` too (status INVALID_ARGUMENT, `attempts` 0).
"""

from __future__ import annotations

from grpclib.const import Status

__all__ = (
    "CallCancelledError",
    "ClientError",
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
)


class ClientError(Exception):
    """A call failed. `status` is the gRPC status; `code` the server's stable error name (REST's
    `error.code`, e.g. "model_not_found"), `field` the request field at fault ("texts[3]"),
    `retry_after_s` the server's hint, `attempts` the attempts made (0: refused before sending)."""

    def __init__(
        self,
        status: Status,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        retry_after_s: float | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.field = field
        self.retry_after_s = retry_after_s
        self.attempts = attempts

    def __str__(self) -> str:
        code = f" [{self.code}]" if self.code else ""
        tries = f" (after {self.attempts} attempts)" if self.attempts > 1 else ""
        return f"{self.status.name}{code}: {self.message}{tries}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status.name}, message={self.message!r}, code={self.code!r},"
            f" field={self.field!r}, retry_after_s={self.retry_after_s!r}, attempts={self.attempts})"
        )


class InvalidArgumentError(ClientError, ValueError):
    """INVALID_ARGUMENT: a field is wrong (`field` names it), or the client refused an argument."""


class NotFoundError(ClientError):
    """NOT_FOUND: no such model or version."""


class ResourceExhaustedError(ClientError):
    """RESOURCE_EXHAUSTED: the model's queue is full (`retry_after_s`), or the message is too large."""


class UnavailableError(ClientError):
    """UNAVAILABLE: no server answered, the connection was lost, the worker crashed, the model failed
    to load or had no memory in time, or the server is shutting down. Retried (see `RetryPolicy`)."""


class DeadlineExceededError(ClientError, TimeoutError):
    """DEADLINE_EXCEEDED: the call's deadline passed (on the server, or here before its answer)."""


class CallCancelledError(ClientError):
    """CANCELLED: the server cancelled the call."""


class UnauthenticatedError(ClientError):
    """UNAUTHENTICATED: no token, or an unknown one."""


class PermissionDeniedError(ClientError):
    """PERMISSION_DENIED: the token lacks the scope."""


class InternalError(ClientError):
    """INTERNAL: the server failed unexpectedly; the message carries its trace id."""
