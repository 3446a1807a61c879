"""Results in an S3 bucket (AWS, MinIO, SeaweedFS...), fetched by clients at presigned URLs.

Each result is uploaded to `s3.bucket` under `s3.prefix + <expires unix>-<uuid hex><suffix>`, and
its URL is a SigV4 presigned GET valid for `result_ttl_s` (at most 7 days, the SigV4 limit). A
sweeper deletes the objects under the prefix whose expiry passed more than a minute ago (only names
of that form: nothing else under the prefix is touched); `s3.delete_expired = false` turns it off for
buckets that have a lifecycle rule, or credentials that may not list and delete.

aiobotocore runs on asyncio only, so this store needs the asyncio backend (the production
server runs asyncio); it is imported only when configured (botocore is slow to import).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
import structlog
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import (  # type: ignore[import-untyped]
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from modelmora.config import ConfigError, Settings

from .base import (
    SWEEP_GRACE_S,
    ResultStoreUnavailable,
    StoredResult,
    check_suffix,
    expiry_of,
    new_name,
    sweep_interval,
    sweeping,
)

__all__ = ("MAX_PRESIGN_S", "S3ResultStore", "open_s3_store")

log = structlog.get_logger("modelmora.results")

MAX_PRESIGN_S = 7 * 24 * 3600
"""The longest a SigV4 presigned URL can be valid."""
_RETRY_AFTER_S = 5.0
_DELETE_BATCH = 1000
"""Keys per DeleteObjects call (the S3 limit)."""


class S3ResultStore:
    """Uploads results with an open aiobotocore S3 client and presigns their GET URLs.

    Args:
        client: an open aiobotocore S3 client.
        bucket: the bucket, which must exist.
        prefix: prepended to every object key.
        ttl_s: how long a presigned URL stays valid (at most `MAX_PRESIGN_S`).
        endpoint: the endpoint named in error messages (no credentials in it).
        clock: the unix time now.
        sweep_grace_s: an object is deleted this long after its expiry.
    """

    kind = "s3"

    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        prefix: str,
        ttl_s: float,
        endpoint: str = "AWS S3",
        clock: Callable[[], float] = time.time,
        sweep_grace_s: float = SWEEP_GRACE_S,
    ) -> None:
        self._client = client
        self.bucket = bucket
        self.prefix = prefix
        self.expires_in = max(1, math.ceil(ttl_s))
        self._endpoint = endpoint
        self._clock = clock
        self._grace = sweep_grace_s

    async def put(self, data: bytes, *, content_type: str, suffix: str) -> StoredResult:
        """Upload `data` and return its presigned URL (see `ResultStore.put`).

        Raises:
            ValueError: a malformed suffix.
            ResultStoreUnavailable: the endpoint is unreachable, or the bucket refused the upload
                (no such bucket, access denied, bad credentials...).
        """
        check_suffix(suffix)
        # the name's expiry is never before the URL's: the URL is signed after this clock reading
        expires = math.ceil(self._clock()) + self.expires_in
        key = self.prefix + new_name(expires, suffix)
        try:
            url: str = await self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.expires_in
            )
            await self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except (BotoCoreError, ClientError, OSError) as exc:
            raise self._unavailable(exc) from exc
        return StoredResult(url, float(expires))

    # --- sweeping ------------------------------------------------------------------------

    async def sweep(self, now: float | None = None) -> int:
        """Delete the objects under the prefix whose expiry (plus the grace) has passed; returns how
        many were deleted.

        Names start with the expiry, a 10-digit number until the year 2286, so the listing comes in
        expiry order and stops at the first page that holds a live result: a sweep reads the
        expired objects and one page more, however many live ones there are.

        Raises:
            BotoCoreError, ClientError, OSError: the listing or a deletion failed.
        """
        now = self._clock() if now is None else now
        stale: list[dict[str, str]] = []
        paginator = self._client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            live = False
            for obj in page.get("Contents", []):
                expires = expiry_of(obj["Key"][len(self.prefix) :])
                if expires is None:
                    continue
                if expires + self._grace < now:
                    stale.append({"Key": obj["Key"]})
                else:
                    live = True
            if live:
                break
        removed = 0
        for start in range(0, len(stale), _DELETE_BATCH):
            batch = stale[start : start + _DELETE_BATCH]
            resp = await self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            errors = resp.get("Errors") or []
            removed += len(batch) - len(errors)
            if errors:
                log.warning("result_delete_failed", bucket=self.bucket, failed=len(errors), error=errors[0].get("Code"))
        return removed

    async def run_sweeper(self, interval_s: float) -> None:
        """Sweep now and then every `interval_s` seconds, until cancelled. A failure is logged as a
        warning once, then at debug level until a sweep succeeds again."""
        failing = False
        while True:
            try:
                removed = await self.sweep()
            except (BotoCoreError, ClientError, OSError) as exc:
                code = str(exc.response.get("Error", {}).get("Code")) if isinstance(exc, ClientError) else ""
                report = log.debug if failing else log.warning
                report(
                    "result_sweep_failed",
                    bucket=self.bucket,
                    endpoint=self._endpoint,
                    error=code or type(exc).__name__,
                )
                failing = True
            else:
                failing = False
                if removed:
                    log.debug("results_swept", bucket=self.bucket, removed=removed)
            await anyio.sleep(interval_s)

    def _unavailable(self, exc: Exception) -> ResultStoreUnavailable:
        """A client-safe error for `exc`: it names the bucket, endpoint and error code, never
        credentials or the server's own message."""
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", "unknown"))
            reason = f"the S3 bucket {self.bucket!r} at {self._endpoint} refused the upload ({code})"
        elif isinstance(exc, NoCredentialsError):
            code = "no_credentials"
            reason = "no S3 credentials are configured (s3.access_key_id / s3.secret_access_key or the AWS chain)"
        elif isinstance(exc, BotoConnectionError | HTTPClientError | OSError):
            code = type(exc).__name__
            reason = f"cannot reach the S3 endpoint {self._endpoint} (bucket {self.bucket!r})"
        else:
            code = type(exc).__name__
            reason = f"the upload to S3 bucket {self.bucket!r} at {self._endpoint} failed ({code})"
        log.warning("result_store_unavailable", bucket=self.bucket, endpoint=self._endpoint, error=code)
        return ResultStoreUnavailable(f"result store unavailable: {reason}", retry_after_s=_RETRY_AFTER_S)


def _endpoint_label(endpoint_url: str) -> str:
    """The endpoint without any user:password part, for messages."""
    if not endpoint_url:
        return "AWS S3"
    parts = urlsplit(endpoint_url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


@asynccontextmanager
async def open_s3_store(settings: Settings, *, max_attempts: int = 3) -> AsyncIterator[S3ResultStore]:
    """An S3 store whose aiobotocore client stays open while the context is open.

    Args:
        settings: `s3.*` names the bucket, endpoint, region, credentials, addressing style.
        max_attempts: attempts per S3 call, first included (botocore's "standard" retries).

    Raises:
        ConfigError: no bucket, half of a key pair, an endpoint URL that is not http(s) or holds
            credentials, or a TTL outside 1 s to 7 days.
        RuntimeError: not running on asyncio (aiobotocore is asyncio-only).
    """
    s3 = settings.s3
    if not s3.bucket:
        raise ConfigError('result_store = "s3" needs s3.bucket (env MODELMORA_S3__BUCKET)')
    if bool(s3.access_key_id) != bool(s3.secret_access_key):
        raise ConfigError("s3.access_key_id and s3.secret_access_key must be set together (or both left empty)")
    if s3.endpoint_url:
        endpoint = urlsplit(s3.endpoint_url)
        try:
            valid = endpoint.scheme in ("http", "https") and bool(endpoint.hostname) and endpoint.port != 0
        except ValueError:  # a port that is not a number
            valid = False
        if not valid:
            raise ConfigError("s3.endpoint_url must be an http(s) URL such as http://127.0.0.1:9000")
        if endpoint.username is not None or endpoint.password is not None:
            raise ConfigError("s3.endpoint_url must not hold credentials (use s3.access_key_id, s3.secret_access_key)")
    if not 0 < settings.result_ttl_s <= MAX_PRESIGN_S:
        raise ConfigError(
            f"result_ttl_s must be between 1 s and {MAX_PRESIGN_S} s (7 days, the longest an S3 presigned URL "
            f"lives) with the s3 result store, not {settings.result_ttl_s}"
        )
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError("the s3 result store needs the asyncio backend (aiobotocore is asyncio-only)") from None

    from aiobotocore.session import get_session  # type: ignore[import-untyped]

    kwargs: dict[str, Any] = {
        "region_name": s3.region or None,
        "config": Config(
            signature_version="s3v4",
            s3={"addressing_style": s3.addressing_style},
            connect_timeout=5,
            read_timeout=60,
            retries={"max_attempts": max_attempts, "mode": "standard"},
        ),
    }
    if s3.endpoint_url:
        kwargs["endpoint_url"] = s3.endpoint_url
    if s3.access_key_id:
        kwargs["aws_access_key_id"] = s3.access_key_id
        kwargs["aws_secret_access_key"] = s3.secret_access_key
    async with get_session().create_client("s3", **kwargs) as client:
        store = S3ResultStore(
            client,
            s3.bucket,
            prefix=s3.prefix,
            ttl_s=settings.result_ttl_s,
            endpoint=_endpoint_label(s3.endpoint_url),
        )
        interval = sweep_interval(settings.result_ttl_s)
        async with sweeping((lambda: store.run_sweeper(interval)) if s3.delete_expired else None):
            yield store
