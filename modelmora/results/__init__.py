"""Result stores for large outputs (images): filesystem with signed URLs, S3 with presigned URLs.

`open_result_store(settings)` opens the configured one for the server's lifetime. The REST
layer mounts `result_route(store)` when the store is a `FilesystemResultStore`, and turns a
relative `StoredResult.url` into an absolute one with `absolute_url(url, request.base_url)`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from modelmora.config import Settings

from .base import (
    ResultNotFound,
    ResultStore,
    ResultStoreUnavailable,
    StoredResult,
    absolute_url,
    check_suffix,
    content_type_for,
)
from .filesystem import RESULTS_PATH, FilesystemResultStore, load_or_create_secret, open_filesystem_store, result_route

__all__ = (
    "RESULTS_PATH",
    "FilesystemResultStore",
    "ResultNotFound",
    "ResultStore",
    "ResultStoreUnavailable",
    "StoredResult",
    "absolute_url",
    "check_suffix",
    "content_type_for",
    "load_or_create_secret",
    "open_filesystem_store",
    "open_result_store",
    "result_route",
)


@asynccontextmanager
async def open_result_store(settings: Settings) -> AsyncIterator[ResultStore | None]:
    """The store `settings.result_store` names, open while the context is: None for "inline";
    "filesystem" runs its sweeper meanwhile; "s3" holds its client (asyncio backend only).

    Raises:
        ConfigError: the store's settings are incomplete or invalid (e.g. "s3" without a bucket).
        RuntimeError: the s3 store outside asyncio.
    """
    if settings.result_store == "inline":
        yield None
    elif settings.result_store == "filesystem":
        async with open_filesystem_store(settings) as fs:
            yield fs
    else:
        from .s3 import open_s3_store

        async with open_s3_store(settings) as s3:
            yield s3
