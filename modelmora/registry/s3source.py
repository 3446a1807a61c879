"""Model sources in S3 (or MinIO, SeaweedFS...): `s3://bucket/prefix/` (every object under the
prefix is a file of the model, at its path below the prefix) or `s3://bucket/key` naming one object
(an archive, unpacked like an HTTP one, or a single file).

The endpoint, region, credentials and addressing style are the `[s3]` settings' (empty
credentials: the standard AWS chain). Objects go through the download cache (`cache.py`) under
their `s3://` URL: an object whose ETag is unchanged is not downloaded again, and an interrupted
download resumes (a ranged GET that must match the ETag): at once when a connection drops midway,
else on the next install. aiobotocore runs on asyncio: the fetch
runs its own asyncio loop (installs run in a thread of their own, or in the CLI).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from ..config import S3Settings
from ..errors import InvalidInput, ModelNotFound, PayloadTooLarge, SourceError
from .archive import safe_member_path
from .cache import DownloadCache

__all__ = ("S3Object", "fetch_s3", "split_s3_url")

S3Object = tuple[str, int, str]
"""(key, size in bytes, ETag) of one object."""
_CHUNK = 1 << 20
RESUME_TRIES = 3
"""Tries of one object whose download is cut midway (each must bring more bytes)."""


def split_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` as ("bucket", "some/prefix").

    Raises:
        InvalidInput: no bucket.
    """
    bucket, _, key = url.removeprefix("s3://").partition("/")
    if not bucket:
        raise InvalidInput(f"source {url!r}: an s3:// URL names a bucket (s3://bucket/prefix)", field="source")
    return bucket, key


def _client_kwargs(s3: S3Settings) -> dict[str, Any]:
    from botocore.config import Config  # type: ignore[import-untyped]

    kwargs: dict[str, Any] = {
        "region_name": s3.region or None,
        "config": Config(
            signature_version="s3v4",
            s3={"addressing_style": s3.addressing_style},
            connect_timeout=10,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
        ),
    }
    if s3.endpoint_url:
        kwargs["endpoint_url"] = s3.endpoint_url
    if s3.access_key_id:
        kwargs["aws_access_key_id"] = s3.access_key_id
        kwargs["aws_secret_access_key"] = s3.secret_access_key
    return kwargs


async def _objects(client: Any, bucket: str, key: str) -> tuple[list[S3Object], str]:
    """The objects of the source and the prefix their relative paths start after."""
    if key and not key.endswith("/"):
        try:
            head = await client.head_object(Bucket=bucket, Key=key)
            return [(key, int(head["ContentLength"]), str(head.get("ETag", "")))], key.rsplit("/", 1)[0] + "/"
        except Exception as exc:
            if _status(exc) not in (403, 404):
                raise
        key += "/"
    found: list[S3Object] = []
    paginator = client.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket, Prefix=key):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                found.append((obj["Key"], int(obj["Size"]), str(obj.get("ETag", ""))))
    return found, key


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(code) if code is not None else None
    return None


async def _download(
    client: Any, bucket: str, obj: S3Object, cache: DownloadCache, progress: Callable[[int], None]
) -> Path:
    """The cached copy of one object (downloaded, resumed, or reused when its ETag is unchanged)."""
    key, size, etag = obj
    url = f"s3://{bucket}/{key}"
    known = cache.validators(url)
    if known is not None and etag and known[1] == etag:
        cache.touch(url, known[0])
        blob = cache.blob(known[0])
        assert blob is not None
        progress(size)
        return blob
    part, meta = cache.partial_paths(url)
    have = part.stat().st_size if part.is_file() else 0
    try:
        resume = have and json.loads(meta.read_text()).get("validator") == etag and have < size
    except (OSError, ValueError):
        resume = False
    args: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if resume:
        args |= {"Range": f"bytes={have}-", "IfMatch": etag}
    else:
        have = 0
    meta.write_text(json.dumps({"url": url, "validator": etag}))
    h = hashlib.sha256()
    if resume:
        with part.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    progress(have)
    response = await client.get_object(**args)
    async with response["Body"] as body:
        with part.open("ab" if resume else "wb") as out:
            while chunk := await body.read(_CHUNK):
                out.write(chunk)
                h.update(chunk)
                progress(len(chunk))
    meta.unlink(missing_ok=True)
    return cache.add(part, h.hexdigest(), url, etag=etag)


async def _fetch(
    url: str,
    settings: S3Settings,
    cache: DownloadCache,
    *,
    max_bytes: int,
    max_objects: int,
    progress: Callable[[int, int], None] | None,
) -> list[tuple[str, Path]]:
    from aiobotocore.session import get_session  # type: ignore[import-untyped]

    bucket, key = split_s3_url(url)
    async with get_session().create_client("s3", **_client_kwargs(settings)) as client:
        objects, base = await _objects(client, bucket, key)
        if not objects:
            raise ModelNotFound(f"{url}: no object there, and none under it", field="source")
        if len(objects) > max_objects:
            raise PayloadTooLarge(f"{url}: more than {max_objects} objects (max_archive_members)", field="source")
        total = sum(size for _, size, _ in objects)
        if total > max_bytes:
            raise PayloadTooLarge(f"{url}: {total} bytes, more than {max_bytes} (max_download_bytes)", field="source")
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            if progress:
                progress(done[0], total)

        fetched = []
        for obj in objects:
            rel = safe_member_path(obj[0].removeprefix(base), f"the object {obj[0]} of {url}").as_posix()
            fetched.append((rel, await _download_resuming(client, bucket, obj, cache, advance)))
        return fetched


async def _download_resuming(
    client: Any, bucket: str, obj: S3Object, cache: DownloadCache, progress: Callable[[int], None]
) -> Path:
    """`_download`, resumed (a ranged GET) when the connection drops midway, as long as each try
    brings more bytes (at most `RESUME_TRIES` tries).

    Raises:
        SourceError: still cut short: the bytes so far stay in the cache for the next install.
    """
    url = f"s3://{bucket}/{obj[0]}"
    part, _ = cache.partial_paths(url)
    for attempt in range(1, RESUME_TRIES + 1):
        had = part.stat().st_size if part.is_file() else 0
        reported = 0

        def counted(n: int) -> None:
            nonlocal reported
            reported += n
            progress(n)

        try:
            return await _download(client, bucket, obj, cache, counted)
        except Exception as exc:
            have = part.stat().st_size if part.is_file() else 0
            if _status(exc) is not None or have <= had:  # an answer of S3's, or nothing came: no resume
                raise
            progress(-reported)  # the next try reports the bytes kept again
            if attempt == RESUME_TRIES:
                raise SourceError(
                    f"downloading {url} was cut short after {have} of {obj[1]} bytes ({type(exc).__name__}):"
                    " run the install again to resume",
                    field="source",
                ) from None
    raise AssertionError("unreachable")


def fetch_s3(
    url: str,
    settings: S3Settings,
    cache: DownloadCache,
    *,
    max_bytes: int,
    max_objects: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[str, Path]]:
    """Download (or reuse from the cache) the objects of an `s3://` source.

    Returns:
        (relative path, cached file) of each object: a single object's path is its name.

    Raises:
        ModelNotFound: no object at or under the URL, or no such bucket.
        SourceError: S3 cannot be reached, refuses access, or the download is cut short again and
            again (a cut is resumed at once; what came is kept, and the next attempt resumes it).
        PayloadTooLarge: more objects or bytes than allowed.
        InvalidInput: an object key that would land outside the model folder.
    """
    try:
        return anyio.run(
            lambda: _fetch(url, settings, cache, max_bytes=max_bytes, max_objects=max_objects, progress=progress),
            backend="asyncio",
        )
    except (InvalidInput, ModelNotFound, PayloadTooLarge, SourceError):
        raise
    except Exception as exc:
        status = _status(exc)
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "") if status else ""
        if status == 404 or code == "NoSuchBucket":
            raise ModelNotFound(f"{url}: {code or 'not found'}", field="source") from None
        if status in (401, 403):
            raise SourceError(f"{url}: S3 refused access ({code or status}): check the s3 credentials") from None
        raise SourceError(f"{url}: {type(exc).__name__}: {exc}", field="source") from None
