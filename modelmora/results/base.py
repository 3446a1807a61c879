"""What every result store shares: the stored result, the store protocol, its errors."""

from __future__ import annotations

import mimetypes
import re
from dataclasses import dataclass
from typing import Protocol

from modelmora.errors import ModelMoraError

__all__ = (
    "ResultNotFound",
    "ResultStore",
    "ResultStoreUnavailable",
    "StoredResult",
    "absolute_url",
    "content_type_for",
    "check_suffix",
)

_SUFFIX = re.compile(r"(\.[a-z0-9]{1,10})?")
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
    code = "result_not_found"


class ResultStoreUnavailable(ModelMoraError):
    """The result store (e.g. the S3 bucket) cannot be reached or refused the write."""

    http_status = 503
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
