"""Job callbacks: when a job with a `callback_url` reaches a final status, the server POSTs the
job's status there, signed, and retries a failed delivery with backoff.

The body is JSON: `{"job_id", "model_id", "status", "attempts", "finished_at", "error",
"result_url"}`. Headers: `X-ModelMora-Timestamp` (Unix seconds) and `X-ModelMora-Signature:
sha256=<hex>`, the HMAC-SHA256 under `callback_secret` of `<timestamp>.<body>` (a receiver checks
it, and the timestamp's age). A 2xx answer delivers it; anything else (or no answer within
`callback_timeout_s`) is retried after `callback_retry_base_s`, doubled each time, until
`callback_max_attempts` were made. Delivery state is kept in the job store, so a restart resumes
pending deliveries (a receiver may so see one twice: it is keyed by job id).

The URL answers to the image URLs' rules: http(s) only, and its host's addresses (checked again
at each delivery, and the connection pinned to them) must be public unless `allow_private_urls`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time

import httpx
import msgspec
import structlog

from ..config import Settings
from ..errors import InvalidInput
from ..images import is_public_address, system_resolve
from .record import JobRecord

__all__ = ("CallbackSender", "check_callback_url", "sign")

log = structlog.get_logger("modelmora.jobs")

FIELD = "$.callback_url"
_encoder = msgspec.json.Encoder()


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature header's value: `sha256=` + hex HMAC-SHA256 of `<timestamp>.<body>`."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def _parse(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise InvalidInput("callback_url is not a valid URL", field=FIELD) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidInput("callback_url must be an http(s) URL with a host", field=FIELD)
    return parsed


async def check_callback_url(url: str, settings: Settings) -> list[str]:
    """The addresses to deliver to; refuses what the rules above refuse.

    Raises:
        InvalidInput: callbacks are off (no `callback_secret`), the URL is malformed, its host does
            not resolve, or it resolves to a private address (without `allow_private_urls`).
    """
    if not settings.callback_secret:
        raise InvalidInput("callbacks need callback_secret set on the server", field=FIELD)
    if len(url) > 2048:
        raise InvalidInput("callback_url is longer than 2048 characters", field=FIELD)
    parsed = _parse(url)
    host = parsed.host
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = list(await system_resolve(host, port))
        except OSError:
            addresses = []
    if not addresses:
        raise InvalidInput("could not resolve callback_url's host", field=FIELD)
    if not settings.allow_private_urls:
        for text in addresses:
            if not is_public_address(ipaddress.ip_address(text)):
                raise InvalidInput(
                    "callback_url resolves to a private/loopback/link-local address; set allow_private_urls to"
                    " allow it",
                    field=FIELD,
                )
    return addresses


class CallbackSender:
    """Delivers one job's callback (see the module's docstring)."""

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.secret = settings.callback_secret.encode()
        self.transport = transport
        self.public_url = settings.public_url.rstrip("/")

    def body(self, job: JobRecord) -> bytes:
        error = job.error
        return _encoder.encode(
            {
                "job_id": job.id,
                "model_id": job.model_id,
                "status": job.status,
                "attempts": job.attempts,
                "finished_at": job.finished_at,
                "error": None if error is None else msgspec.to_builtins(error),
                "result_url": f"{self.public_url}/api/v1/jobs/{job.id}/result" if job.has_result else None,
            }
        )

    async def deliver(self, job: JobRecord) -> bool:
        """POST the job's status to its callback_url; True when answered 2xx."""
        assert job.callback_url is not None
        try:
            addresses = await check_callback_url(job.callback_url, self.settings)
        except InvalidInput as exc:
            log.warning("callback_refused", job=job.id, reason=exc.message)
            return False
        url = _parse(job.callback_url)
        body = self.body(job)
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "Host": url.netloc.decode("ascii"),
            "User-Agent": "ModelMora callbacks",
            "X-ModelMora-Job": job.id,
            "X-ModelMora-Timestamp": timestamp,
            "X-ModelMora-Signature": sign(self.secret, timestamp, body),
        }
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        transport = self.transport or httpx.AsyncHTTPTransport(trust_env=False)
        timeout = httpx.Timeout(self.settings.callback_timeout_s)
        async with httpx.AsyncClient(transport=transport, trust_env=False, timeout=timeout) as client:
            for address in addresses:  # the checked addresses, in turn: the first that connects
                request = client.build_request(
                    "POST", url.copy_with(host=address), headers=headers, content=body, extensions=extensions
                )
                try:
                    response = await client.send(request)
                except httpx.ConnectError:
                    continue
                except httpx.HTTPError as exc:
                    log.info("callback_failed", job=job.id, reason=type(exc).__name__)
                    return False
                if 200 <= response.status_code < 300:
                    return True
                log.info("callback_failed", job=job.id, status=response.status_code)
                return False
        log.info("callback_failed", job=job.id, reason="could not connect")
        return False
