"""What every result store shares: the stored result, the store protocol, its errors."""

from __future__ import annotations

import mimetypes
import re
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from modelmora.errors import GrpcStatus, ModelMoraError

__all__ = (
    "SWEEP_GRACE_S",
    "ResultNotFound",
    "ResultStore",
    "ResultStoreUnavailable",
    "StoredResult",
    "absolute_url",
    "content_type_for",
    "check_suffix",
    "expiry_of",
    "new_name",
    "sweep_interval",
    "sweeping",
)

_SUFFIX = re.compile(r"(\.[a-z0-9]{1,10})?")
_NAME = re.compile(r"([0-9]{1,12})-[0-9a-f]{32}(\.[a-z0-9]{1,10})?")
SWEEP_GRACE_S = 60.0
"""A stored result is deleted this long after it expires (a download that began in time may finish)."""
_CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".wav": "audio/wav",
    ".bin": "application/octet-stream",
    "": "application/octet-stream",
}


@dataclass(frozen=True, slots=True)
class StoredResult:
    """Where a stored result can be fetched, and until when (unix time)."""

    url: str
    """Absolute for S3; for the filesystem store a path + query under `/api/v1/results/`
    (absolute when `public_url` is configured): see `absolute_url`."""
    expires_at: float


class ResultStore(Protocol):
    """Keeps large results (images) for a while and hands out URLs to fetch them."""

    kind: str
    """"filesystem" or "s3"."""

    async def put(self, data: bytes, *, content_type: str, suffix: str) -> StoredResult:
        """Store `data` and return a URL that serves it until it expires.

        Args:
            data: the exact bytes to serve.
            content_type: the MIME type served with them, e.g. "image/png".
            suffix: the file name suffix, e.g. ".png" (lower case letters and digits after the dot, or "").

        Raises:
            ValueError: a malformed suffix (or, for the filesystem store, a content type that the
                suffix does not serve).
            ResultStoreUnavailable: the storage could not be written.
        """
        ...


class ResultNotFound(ModelMoraError):
    """A signed result URL whose file is gone (swept after expiry) or never existed."""

    http_status = 404
    grpc_status = GrpcStatus.NOT_FOUND
    code = "result_not_found"


class ResultStoreUnavailable(ModelMoraError):
    """The result store (e.g. the S3 bucket) cannot be reached or refused the write."""

    http_status = 503
    grpc_status = GrpcStatus.UNAVAILABLE
    code = "result_store_unavailable"


def check_suffix(suffix: str) -> None:
    """Raises ValueError unless `suffix` is "" or a dot and 1-10 lower case letters or digits."""
    if not _SUFFIX.fullmatch(suffix):
        raise ValueError(f"bad result suffix {suffix!r}: expected e.g. '.png' (lower case letters and digits)")


def content_type_for(suffix: str) -> str:
    """The Content-Type served for a file name suffix (a fixed table, then `mimetypes`)."""
    known = _CONTENT_TYPES.get(suffix)
    if known is not None:
        return known
    guessed, _ = mimetypes.guess_type(f"x{suffix}", strict=False)
    return guessed or "application/octet-stream"


def absolute_url(url: str, base_url: str) -> str:
    """`url` unchanged when absolute, else joined to the server's `base_url` (e.g. the request's
    `base_url`, "http://host:8000/")."""
    if url.startswith("/"):
        return base_url.rstrip("/") + url
    return url


def new_name(expires: int, suffix: str) -> str:
    """A stored result's name: `<expires unix>-<uuid hex><suffix>`, so that a sweeper can tell from
    a listing alone when it expires."""
    return f"{expires}-{uuid.uuid4().hex}{suffix}"


def expiry_of(name: str) -> int | None:
    """The expiry (unix time) in a name made by `new_name`; None for any other name."""
    match = _NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def sweep_interval(ttl_s: float) -> float:
    """Seconds between sweeps: a quarter of the TTL, between 1 s and 60 s."""
    return min(60.0, max(1.0, ttl_s / 4))


@asynccontextmanager
async def sweeping(run: Callable[[], Coroutine[Any, Any, None]] | None) -> AsyncIterator[None]:
    """Runs `run()` (a sweeper loop) in a task group of its own while the context is open; an
    error in the body is re-raised as itself, not wrapped in an ExceptionGroup."""
    if run is None:
        yield
        return
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            yield
        except Exception as exc:
            failure = exc
        finally:
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
