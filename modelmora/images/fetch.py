"""Fetching image URLs without reaching private addresses.

URL fetches refuse loopback, private, link-local, multicast, reserved and unspecified addresses (and
IPv4-mapped/NAT64/6to4 forms of them) after DNS resolution and before connecting, unless
`allow_private_urls`; the connection goes to the address that was checked (no DNS rebinding), every
redirect hop is checked again, and one time limit covers the whole fetch. Proxy environment variables
are ignored (a proxy would resolve the name itself and defeat the check). The body is bounded by
`max_bytes` while it streams in.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import re
import socket
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import cast

import anyio
import httpx

from modelmora.errors import InvalidInput, PayloadTooLarge

from .limits import ImageLimits

__all__ = ("MAX_REDIRECTS", "Resolver", "fetch_url", "is_public_address", "system_resolve")

MAX_REDIRECTS = 5
"""Redirects followed per URL fetch (each hop is resolved and checked again)."""

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
"""A DNS name (after IDNA encoding, which httpx does): labels of letters, digits, '-' and '_'."""
_REQUEST_HEADERS = {
    "Accept": "image/png,image/jpeg,image/webp,*/*;q=0.5",
    "Accept-Encoding": "identity",
    "User-Agent": "ModelMora image fetcher",
}

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""`(host, port) -> IP address strings`: how `fetch_url` resolves a URL's host."""


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """False for loopback, private, link-local, multicast, reserved, unspecified and shared (CGNAT)
    addresses, and for IPv6 forms that embed such an IPv4 address (mapped, NAT64, 6to4, Teredo)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public_address(address.ipv4_mapped)
        if address in _NAT64:
            return is_public_address(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        embedded = [address.sixtofour, *(address.teredo or ())]
        if any(v4 is not None and not is_public_address(v4) for v4 in embedded):
            return False
    return address.is_global and not (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


async def system_resolve(host: str, port: int) -> list[str]:
    """Resolve a host name with the system resolver (`anyio.getaddrinfo`), in its order, without repeats."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def fetch_url(
    url: str,
    field: str,
    limits: ImageLimits,
    *,
    resolve: Resolver | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> bytes:
    """GET an http(s) image URL: checked and pinned addresses, at most MAX_REDIRECTS redirects, the body
    bounded by max_bytes, everything within fetch_timeout_s.

    `resolve` and `transport` replace the system resolver and the network (tests, embedding).
    """
    current = _parse_url(url, field)
    try:
        with anyio.fail_after(limits.fetch_timeout_s):
            async with _client(transport) as client:
                for _ in range(MAX_REDIRECTS + 1):
                    addresses = await _checked_addresses(current, field, limits, resolve or system_resolve)
                    response = await _send(client, current, addresses, field)
                    try:
                        if response.status_code in _REDIRECT_STATUSES:
                            current = _redirect_target(current, response, field)
                            continue
                        if not 200 <= response.status_code < 300:
                            raise InvalidInput(
                                f"fetching the image URL failed with HTTP {response.status_code}", field=field
                            )
                        return await _read_body(response, field, limits)
                    finally:
                        await response.aclose()
    except TimeoutError:
        raise InvalidInput(
            f"fetching the image URL timed out after {limits.fetch_timeout_s:g} s", field=field
        ) from None
    raise InvalidInput(f"the image URL redirected more than {MAX_REDIRECTS} times", field=field)


def _parse_url(url: str, field: str, *, redirect: bool = False) -> httpx.URL:
    what = "the image URL's redirect" if redirect else "the image URL"
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise InvalidInput(f"{what} is not a valid URL", field=field) from None
    if parsed.scheme not in ("http", "https"):
        raise InvalidInput(f"{what} has an unsupported scheme {parsed.scheme!r}; use http or https", field=field)
    if not parsed.host:
        raise InvalidInput(f"{what} has no host", field=field)
    if _ip_literal(parsed) is None and not _HOSTNAME.fullmatch(parsed.raw_host.decode("ascii")):
        raise InvalidInput(f"{what} has an invalid host name", field=field)
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise InvalidInput(f"{what} has an invalid port", field=field)
    return parsed


def _ip_literal(url: httpx.URL) -> str | None:
    """The URL's host when it is an IP address (`[...]` for IPv6 in the URL), normalised; IPv6 zone ids
    (`[fe80::1%25eth0]`) are not accepted."""
    host = url.raw_host.decode("ascii")
    if "%" in host:
        return None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def _redirect_target(current: httpx.URL, response: httpx.Response, field: str) -> httpx.URL:
    location = response.headers.get("location")
    if not location:
        raise InvalidInput(f"the image URL answered HTTP {response.status_code} without a Location", field=field)
    try:
        target = current.join(location)
    except (httpx.InvalidURL, TypeError, ValueError):  # pragma: no cover - httpx.send refuses such a Location first
        raise InvalidInput("the image URL's redirect is not a valid URL", field=field) from None
    return _parse_url(str(target), field, redirect=True)


async def _checked_addresses(url: httpx.URL, field: str, limits: ImageLimits, resolve: Resolver) -> list[str]:
    """The host's addresses, refused if any is not public (unless allow_private_urls)."""
    literal = _ip_literal(url)
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        addresses = [literal] if literal is not None else list(await resolve(host, port))
    except OSError:
        raise InvalidInput("could not resolve the image URL's host", field=field) from None
    if not addresses:
        raise InvalidInput("could not resolve the image URL's host", field=field)
    if not limits.allow_private_urls:
        for text in addresses:
            try:
                public = is_public_address(ipaddress.ip_address(text))
            except ValueError:
                public = False
            if not public:
                raise InvalidInput(
                    "image URL resolves to a private/loopback/link-local address; set allow_private_urls to allow it",
                    field=field,
                )
    return addresses


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """One verifying TLS context (certifi's CA bundle) for every fetch: building one costs milliseconds."""
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def _client(transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
    """A client for one fetch: no pooled connections (a connection is keyed by the IP it was pinned to,
    not by the TLS name), no proxies from the environment, no redirects or timeouts of its own."""
    if transport is None:
        transport = httpx.AsyncHTTPTransport(
            verify=_ssl_context(), trust_env=False, limits=httpx.Limits(max_keepalive_connections=0)
        )
    return httpx.AsyncClient(transport=transport, trust_env=False, follow_redirects=False, timeout=None)


async def _send(client: httpx.AsyncClient, url: httpx.URL, addresses: list[str], field: str) -> httpx.Response:
    """Send the GET to the checked addresses in turn (the first that connects), with the URL's Host and
    TLS server name."""
    headers = {**_REQUEST_HEADERS, "Host": url.netloc.decode("ascii")}
    extensions = {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {}
    reason = "could not connect"
    for address in addresses:
        request = client.build_request("GET", url.copy_with(host=address), headers=headers, extensions=extensions)
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError as exc:
            reason = _short_reason(exc)
        except httpx.HTTPError as exc:
            raise InvalidInput(f"fetching the image URL failed: {_short_reason(exc)}", field=field) from exc
    raise InvalidInput(f"fetching the image URL failed: {reason}", field=field)


async def _read_body(response: httpx.Response, field: str, limits: ImageLimits) -> bytes:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise InvalidInput(
            f"the image URL answered with Content-Encoding {encoding!r}; images must be sent uncompressed",
            field=field,
        )
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise PayloadTooLarge(
            f"image URL response is {declared} bytes, over max_image_bytes ({limits.max_bytes})", field=field
        )
    body = bytearray()
    # Identity encoding: these are the bytes on the wire. When we stop early, `response.aclose()` (the
    # caller's) closes the connection; httpx/httpcore's inner async generators are then left to the event
    # loop's finalizer, which on trio also emits a ResourceWarning (httpx issue #3686; an open upstream PR
    # replaces them with iterator objects). Ignored by default; tests filter it where they stop early.
    chunks = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
    try:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                body += chunk
                if len(body) > limits.max_bytes:
                    raise PayloadTooLarge(
                        f"image URL response is over max_image_bytes ({limits.max_bytes})", field=field
                    )
    except httpx.HTTPError as exc:
        raise InvalidInput(f"fetching the image URL failed: {_short_reason(exc)}", field=field) from exc
    return bytes(body)


def _short_reason(exc: httpx.HTTPError) -> str:
    """A fixed short phrase per failure (never the exception's own text)."""
    if isinstance(exc, httpx.ConnectError):
        cause: BaseException | None = exc
        for _ in range(8):  # the chain: httpx <- httpcore <- ssl
            cause = (cause.__cause__ or cause.__context__) if cause is not None else None
            if isinstance(cause, ssl.SSLError):
                return "TLS handshake or certificate verification failed"
        return "could not connect"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "invalid HTTP response"
    if isinstance(exc, httpx.ReadError | httpx.WriteError):
        return "connection error"
    return "request failed"
