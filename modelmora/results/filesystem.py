"""Results as files under `$MODELMORA_HOME/results/`, served by this server at HMAC-signed URLs.

A file is named `<expires unix>-<uuid hex><suffix>`, so the sweeper can tell when it expires
without a database. Its URL is `/api/v1/results/<name>?expires=<unix>&sig=<hex>`, where `sig`
is HMAC-SHA256 over the name and the expiry with the server's secret: the configured
`result_secret`, else one generated once into `$MODELMORA_HOME/result_secret` (mode 0600) and
reused on every restart (replicas sharing URLs set `result_secret`, e.g. to that file's content).
Works on asyncio and trio.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import anyio
import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from modelmora.config import ConfigError, Settings
from modelmora.errors import Forbidden, ModelMoraError

from .base import (
    SWEEP_GRACE_S,
    ResultNotFound,
    ResultStoreUnavailable,
    StoredResult,
    check_suffix,
    content_type_for,
    expiry_of,
    new_name,
    sweep_interval,
    sweeping,
)

__all__ = (
    "RESULTS_PATH",
    "FilesystemResultStore",
    "load_or_create_secret",
    "open_filesystem_store",
    "result_route",
)

log = structlog.get_logger("modelmora.results")

RESULTS_PATH = "/api/v1/results/"
"""Where the REST app serves stored files (`result_route`)."""
SECRET_FILE = "result_secret"
_EXPIRES = re.compile(r"[0-9]{1,12}")
_SIG = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = ".tmp-"
_TMP_MAX_AGE_S = 3600.0
"""Temporary files older than this were left by a crash mid-write; the sweeper removes them."""


def load_or_create_secret(home: Path, configured: str = "") -> bytes:
    """The HMAC key: `configured` when set, else the content of `home/result_secret`, which is
    created (64 hex digits from `secrets.token_bytes(32)`, mode 0600) the first time.

    Raises:
        ConfigError: the secret file exists but is empty or unreadable.
    """
    if configured:
        return configured.encode()
    path = home / SECRET_FILE
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        tmp = home / f"{_TMP_PREFIX}{SECRET_FILE}-{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_bytes(32).hex() + "\n")
            # link, not rename: of two servers starting at once, the first one's secret wins
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    try:
        secret = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the result URL secret {path}: {exc}") from exc
    if not secret:
        raise ConfigError(f"the result URL secret {path} is empty (delete it to generate a new one)")
    return secret.encode()


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


class FilesystemResultStore:
    """Files in one directory, each served until the expiry in its name, then swept.

    Args:
        directory: where the files go (created if missing).
        secret: the HMAC key for URL signatures.
        ttl_s: how long a stored result's URL stays valid.
        public_url: base URL for absolute result URLs; empty: URLs are paths under `RESULTS_PATH`.
        sweep_grace_s: a file is deleted this long after its expiry (so a response that started
            just before the expiry still finds its file).
        clock: the unix time now (injected by tests).
    """

    kind = "filesystem"

    def __init__(
        self,
        directory: Path,
        secret: bytes,
        *,
        ttl_s: float,
        public_url: str = "",
        sweep_grace_s: float = SWEEP_GRACE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, not {ttl_s}")
        if not secret:
            raise ValueError("the result URL secret must not be empty")
        self.directory = directory
        self.ttl_s = ttl_s
        self._secret = secret
        self._base = public_url.rstrip("/") + RESULTS_PATH if public_url else RESULTS_PATH
        self._grace = sweep_grace_s
        self._clock = clock
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    # --- storing -------------------------------------------------------------------------

    async def put(self, data: bytes, *, content_type: str, suffix: str) -> StoredResult:
        """Write `data` atomically and return its signed URL (see `ResultStore.put`).

        The Content-Type served later is the one the suffix maps to (`content_type_for`), so
        `content_type` must agree with it.

        Raises:
            ValueError: a malformed suffix, or a content type the suffix would not serve.
            ResultStoreUnavailable: the file could not be written.
        """
        check_suffix(suffix)
        if _media_type(content_type) != _media_type(content_type_for(suffix)):
            raise ValueError(
                f"content type {content_type!r} does not match suffix {suffix!r} "
                f"(served as {content_type_for(suffix)!r})"
            )
        expires = math.ceil(self._clock() + self.ttl_s)
        name = new_name(expires, suffix)
        try:
            await anyio.to_thread.run_sync(self._write, name, data)
        except OSError as exc:
            log.warning("result_write_failed", directory=str(self.directory), error=str(exc))
            raise ResultStoreUnavailable("cannot write the result file", retry_after_s=5) from exc
        return StoredResult(self.url_for(name, expires), float(expires))

    def _write(self, name: str, data: bytes) -> None:
        tmp = self.directory / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.directory / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # --- signing -------------------------------------------------------------------------

    def sign(self, name: str, expires: int) -> str:
        """The hex HMAC-SHA256 of `name` and `expires` with the store's secret."""
        message = f"modelmora-result\n{name}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def url_for(self, name: str, expires: int) -> str:
        """The signed URL of file `name`, valid until `expires` (unix seconds)."""
        return f"{self._base}{name}?expires={expires}&sig={self.sign(name, expires)}"

    def verify(self, name: str, expires: str | None, sig: str | None) -> int:
        """Check a request for `name` with the URL's `expires` and `sig` parameters; returns the
        expiry. Touches no file.

        Raises:
            ResultNotFound: `name` is not a result file name (so no such file can exist).
            Forbidden: a missing or wrong signature, or an expired URL.
        """
        if expiry_of(name) is None:
            raise ResultNotFound("no such result")
        if not sig or not expires:
            raise Forbidden("this result URL has no signature (expires and sig parameters are required)")
        sig = sig.lower()
        if not _EXPIRES.fullmatch(expires) or not _SIG.fullmatch(sig):
            raise Forbidden("signature does not match")
        expiry = int(expires)
        if not hmac.compare_digest(self.sign(name, expiry), sig):
            raise Forbidden("signature does not match")
        if expiry <= self._clock():
            when = datetime.fromtimestamp(expiry, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            raise Forbidden(f"this URL expired at {when}")
        return expiry

    # --- serving -------------------------------------------------------------------------

    async def respond(self, name: str, expires: str | None, sig: str | None) -> Response:
        """The HTTP response for GET `RESULTS_PATH + name` with the URL's query parameters."""
        try:
            expiry = self.verify(name, expires, sig)
            path = self.directory / name
            try:
                stat = await anyio.to_thread.run_sync(os.stat, path)
            except FileNotFoundError:
                raise ResultNotFound("this result is gone (expired and deleted, or never stored)") from None
        except (Forbidden, ResultNotFound) as exc:
            return _error_response(exc)
        suffix = name[name.index(".") :] if "." in name else ""
        max_age = max(0, expiry - math.floor(self._clock()))
        headers = {"Cache-Control": f"private, max-age={max_age}", "X-Content-Type-Options": "nosniff"}
        return FileResponse(path, media_type=content_type_for(suffix), headers=headers, stat_result=stat)

    # --- sweeping ------------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> int:
        """Delete the files whose expiry (plus the grace) has passed, and stale temporary files;
        returns how many were deleted. Blocking: call it in a thread."""
        now = self._clock() if now is None else now
        removed = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                expires = expiry_of(entry.name)
                try:
                    if expires is not None:
                        stale = expires + self._grace < now
                    elif entry.name.startswith(_TMP_PREFIX):
                        stale = entry.stat(follow_symlinks=False).st_mtime + _TMP_MAX_AGE_S < now
                    else:
                        continue
                    if stale:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed

    async def run_sweeper(self, interval_s: float) -> None:
        """Sweep now and then every `interval_s` seconds, until cancelled. Errors are logged."""
        while True:
            try:
                removed = await anyio.to_thread.run_sync(self.sweep)
            except OSError as exc:
                log.warning("result_sweep_failed", directory=str(self.directory), error=str(exc))
            else:
                if removed:
                    log.debug("results_swept", removed=removed)
            await anyio.sleep(interval_s)


@asynccontextmanager
async def open_filesystem_store(settings: Settings) -> AsyncIterator[FilesystemResultStore]:
    """The filesystem store under `settings.home_path / "results"`, with its sweeper running in its
    own task group while the context is open.

    Raises:
        ConfigError: a non-positive `result_ttl_s`, or an unreadable secret file.
    """
    if settings.result_ttl_s <= 0:
        raise ConfigError(f"result_ttl_s must be positive, not {settings.result_ttl_s}")
    home = settings.home_path

    def make() -> FilesystemResultStore:
        secret = load_or_create_secret(home, settings.result_secret)
        return FilesystemResultStore(
            home / "results", secret, ttl_s=settings.result_ttl_s, public_url=settings.public_url
        )

    store = await anyio.to_thread.run_sync(make)
    async with sweeping(lambda: store.run_sweeper(sweep_interval(settings.result_ttl_s))):
        yield store


def _error_response(exc: ModelMoraError) -> Response:
    body = msgspec.json.encode({"error": {"code": exc.code, "message": exc.message}})
    return Response(body, status_code=exc.http_status, media_type="application/json")


def result_route(store: FilesystemResultStore) -> Route:
    """The Starlette route serving `store`'s files: GET (and HEAD) `/api/v1/results/{name}`."""

    async def get_result(request: Request) -> Response:
        query = request.query_params
        return await store.respond(request.path_params["name"], query.get("expires"), query.get("sig"))

    return Route(RESULTS_PATH + "{name}", get_result, methods=["GET"], name="get_result")
