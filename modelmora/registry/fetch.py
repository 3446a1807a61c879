"""Downloading a model source over HTTP(S) into the download cache, resuming a download that was
cut short, and reusing what the cache holds.

A fetch asks the server whether what it served last time changed (`If-None-Match` /
`If-Modified-Since`); when it did not (304), or when the content wanted is known by its SHA-256
and already cached, nothing is downloaded. A partial download continues with `Range` and
`If-Range`, so a changed file starts over instead of being spliced.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

from ..errors import ChecksumMismatch, ModelNotFound, PayloadTooLarge, SourceError
from .cache import DownloadCache

__all__ = ("fetch_url",)

_CHUNK = 1 << 20
RESUME_TRIES = 3
"""Tries of one download whose connection drops midway (each must bring more bytes)."""


def _hash_file(path: Path) -> hashlib._Hash:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h


def fetch_url(
    url: str,
    cache: DownloadCache,
    *,
    max_bytes: int,
    timeout_s: float = 60.0,
    expect_sha256: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    transport: httpx.BaseTransport | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[Path, str]:
    """The cached file of `url`'s content and its SHA-256, downloading what is needed.

    Args:
        max_bytes: refuse a file larger than this (`max_download_bytes`).
        timeout_s: give up when the server sends nothing for this long.
        expect_sha256: the content wanted (a lock file's pin): served from the cache when there,
            and a download with another SHA-256 is refused.
        headers: more request headers (a token: dropped when redirected to another host).

    Raises:
        ModelNotFound: the server answers 404 or 410.
        SourceError: the server cannot be reached, refuses, or the download is cut short again
            and again (a dropped connection is resumed at once, up to `RESUME_TRIES` tries that each
            bring more bytes; the bytes so far are kept: the next attempt resumes).
        PayloadTooLarge: the file is larger than `max_bytes`.
        ChecksumMismatch: the content differs from `expect_sha256`.
    """
    if expect_sha256 is not None and (cached := cache.blob(expect_sha256)) is not None:
        cache.touch(url, expect_sha256)
        return cached, expect_sha256
    part, meta = cache.partial_paths(url)
    for attempt in range(1, RESUME_TRIES + 1):
        had = part.stat().st_size if part.is_file() else 0
        try:
            return _fetch_once(
                url, cache, part, meta, max_bytes, timeout_s, expect_sha256, progress, transport, headers
            )
        except httpx.HTTPError as exc:
            done = part.stat().st_size if part.is_file() else 0
            if isinstance(exc, httpx.TransportError) and done > had and attempt < RESUME_TRIES:
                continue  # the connection dropped midway: resume from what came
            cut = f" after {done} bytes (run the install again to resume)" if done else ""
            raise SourceError(f"downloading {url} failed{cut}: {type(exc).__name__}: {exc}", field="source") from None
    raise AssertionError("unreachable")


def _fetch_once(
    url: str,
    cache: DownloadCache,
    part: Path,
    meta: Path,
    max_bytes: int,
    timeout_s: float,
    expect_sha256: str | None,
    progress: Callable[[int, int], None] | None,
    transport: httpx.BaseTransport | None,
    extra_headers: Mapping[str, str] | None,
) -> tuple[Path, str]:
    """One request: the whole file, the rest of a partial download, or "not modified"."""
    headers = {**(extra_headers or {}), "Accept-Encoding": "identity"}
    known = cache.validators(url)
    if known is not None and expect_sha256 in (None, known[0]):
        if known[1]:
            headers["If-None-Match"] = known[1]
        elif known[2]:
            headers["If-Modified-Since"] = known[2]
    have = part.stat().st_size if part.is_file() else 0
    validator = ""
    if have:
        try:
            validator = str(json.loads(meta.read_text()).get("validator", ""))
        except (OSError, ValueError):
            validator = ""
        if validator:
            headers["Range"] = f"bytes={have}-"
            headers["If-Range"] = validator
        else:
            have = 0
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0))
    with (
        httpx.Client(follow_redirects=True, timeout=timeout, transport=transport) as client,
        client.stream("GET", url, headers=headers) as response,
    ):
        return _receive(url, response, cache, part, meta, have, max_bytes, expect_sha256, known, progress)


def _receive(
    url: str,
    response: httpx.Response,
    cache: DownloadCache,
    part: Path,
    meta: Path,
    have: int,
    max_bytes: int,
    expect_sha256: str | None,
    known: tuple[str, str, str] | None,
    progress: Callable[[int, int], None] | None,
) -> tuple[Path, str]:
    status = response.status_code
    if status == 304 and known is not None:
        cache.touch(url, known[0])
        blob = cache.blob(known[0])
        assert blob is not None
        return blob, known[0]
    if status in (404, 410):
        raise ModelNotFound(f"{url} does not exist (HTTP {status})", field="source")
    if status not in (200, 206):
        raise SourceError(f"{url} answered HTTP {status}", field="source")
    resumed = status == 206 and have > 0
    if not resumed:
        have = 0
    length = response.headers.get("content-length")
    total = have + int(length) if length and length.isdigit() else 0
    if total > max_bytes:
        raise PayloadTooLarge(f"{url} is {total} bytes, more than {max_bytes} (max_download_bytes)", field="source")
    validator = response.headers.get("etag") or response.headers.get("last-modified") or ""
    meta.write_text(json.dumps({"url": url, "validator": validator if not validator.startswith("W/") else ""}))
    h = _hash_file(part) if resumed else hashlib.sha256()
    done = have
    if progress:
        progress(done, total)
    with part.open("ab" if resumed else "wb") as out:
        for chunk in response.iter_bytes():  # as it arrives: what came before a cut is kept
            done += len(chunk)
            if done > max_bytes:
                out.close()
                part.unlink(missing_ok=True)
                raise PayloadTooLarge(f"{url} is more than {max_bytes} bytes (max_download_bytes)", field="source")
            out.write(chunk)
            h.update(chunk)
            if progress:
                progress(done, max(total, done))
    if total and done != total:
        raise SourceError(f"downloading {url} stopped after {done} of {total} bytes (run it again to resume)")
    digest = h.hexdigest()
    meta.unlink(missing_ok=True)
    if expect_sha256 is not None and digest != expect_sha256:
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"{url} now serves content with SHA-256 {digest[:12]}..., not the pinned {expect_sha256[:12]}...",
            file=url.rsplit("/", 1)[-1],
        )
    etag = response.headers.get("etag", "")
    return cache.add(part, digest, url, etag=etag, last_modified=response.headers.get("last-modified", "")), digest
