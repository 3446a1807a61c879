"""Image inputs (img2embed, img2txt): base64, data URIs and http(s) URLs to raw RGB pixels.

An image reference is a string: raw base64 (standard or URL-safe alphabet, whitespace and missing
padding tolerated), a data URI (`data:image/png;base64,...`), or an http(s) URL. The result is a
`Pixels`: RGB uint8 bytes in row-major (height, width, 3) order, ready to be copied into shared
memory for a worker. Only PNG, JPEG and WebP are accepted. An embedded ICC profile (Display P3
photos from phones, Adobe RGB, CMYK print profiles) is honoured: the pixels are converted to sRGB,
the colour space vision models are trained on.

Limits (from `Settings`): `max_image_bytes` bounds the encoded image (checked on the base64 length
before decoding it, and on the stream while fetching); `max_image_pixels` bounds width x height and is
checked from the image header before any pixel is decoded (decompression bombs).

URL fetches refuse loopback, private, link-local, multicast, reserved and unspecified addresses (and
IPv4-mapped/NAT64/6to4 forms of them) after DNS resolution and before connecting, unless
`allow_private_urls`; the connection goes to the address that was checked (no DNS rebinding), every
redirect hop is checked again, and one time limit covers the whole fetch. Proxy environment variables
are ignored (a proxy would resolve the name itself and defeat the check).

Decoding is CPU work: `decode_image` is synchronous and `load_image` runs it in a worker thread.
"""

from __future__ import annotations

import binascii
import contextlib
import functools
import io
import ipaddress
import re
import socket
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TYPE_CHECKING, cast

import anyio
import anyio.to_thread
import httpx
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from modelmora.errors import InvalidInput, ModelMoraError, PayloadTooLarge

if TYPE_CHECKING:
    from modelmora.config import Settings

__all__ = (
    "MAX_CONCURRENT_LOADS",
    "MAX_REDIRECTS",
    "ImageLimits",
    "Pixels",
    "Resolver",
    "decode_image",
    "fetch_url",
    "is_public_address",
    "load_image",
    "load_images",
    "system_resolve",
)

MAX_REDIRECTS = 5
"""Redirects followed per URL fetch (each hop is resolved and checked again)."""
MAX_CONCURRENT_LOADS = 8
"""Images of one request fetched/decoded at the same time by `load_images`."""

_OPEN_FORMATS = ("PNG", "JPEG", "WEBP")
_ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP"})
"""MPO: a JPEG with extra pictures (many phone cameras); its first picture is used."""
_UNSUPPORTED = "use PNG, JPEG or WebP"
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]{0,31}):")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_WHITESPACE = " \t\r\n"
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
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


@dataclass(frozen=True, slots=True)
class Pixels:
    """A decoded image: RGB, uint8, row-major (height, width, 3)."""

    data: bytes = dataclass_field(repr=False)
    height: int
    width: int


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """The image limits of one server (see `Settings`)."""

    max_bytes: int
    max_pixels: int
    fetch_timeout_s: float
    allow_private_urls: bool
    max_request_pixels: int = 64 * 2**20
    """All images of one request together (their decoded pixels are held until it is answered)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            fetch_timeout_s=settings.url_fetch_timeout_s,
            allow_private_urls=settings.allow_private_urls,
            max_request_pixels=settings.max_request_pixels,
        )


# --- decoding ------------------------------------------------------------------------------------


def decode_image(data: bytes, field: str, limits: ImageLimits) -> Pixels:
    """Decode PNG/JPEG/WebP bytes to RGB pixels (EXIF orientation applied, alpha over white).

    Synchronous and CPU-bound: async callers run it in a thread (`load_image` does).
    """
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"image is {len(data)} bytes, over max_image_bytes ({limits.max_bytes})", field=field)
    if not data:
        raise InvalidInput("image is empty", field=field)
    try:
        with Image.open(io.BytesIO(data), formats=_OPEN_FORMATS) as img:
            if img.format not in _ACCEPTED_FORMATS:  # pragma: no cover - formats= already restricts it
                raise InvalidInput(f"unsupported image format {img.format}; {_UNSUPPORTED}", field=field)
            width, height = img.size
            if width * height > limits.max_pixels:
                raise PayloadTooLarge(
                    f"image is {width}x{height} pixels, over max_image_pixels ({limits.max_pixels})", field=field
                )
            img.load()
            rgb = _to_rgb(img)
    except ModelMoraError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(_bomb_message(exc, limits), field=field) from exc
    except UnidentifiedImageError:
        other = _detected_format(data)
        if other is not None:
            raise InvalidInput(f"unsupported image format {other}; {_UNSUPPORTED}", field=field) from None
        raise InvalidInput(
            f"image is not a valid PNG, JPEG or WebP file (corrupt or unsupported format); {_UNSUPPORTED}", field=field
        ) from None
    except MemoryError:
        raise
    except Exception as exc:
        raise InvalidInput("image data is corrupt or truncated", field=field) from exc
    return Pixels(data=rgb.tobytes(), height=rgb.height, width=rgb.width)


def _bomb_message(exc: Exception, limits: ImageLimits) -> str:
    """PIL refused the size in `Image.open` (its own guard, before our check): over its limit, or twice it."""
    pil_limit = (Image.MAX_IMAGE_PIXELS or 0) * (2 if isinstance(exc, Image.DecompressionBombError) else 1)
    if limits.max_pixels <= pil_limit:
        return f"image has more pixels than max_image_pixels ({limits.max_pixels})"
    return f"image has more pixels than the decoder allows ({pil_limit}; max_image_pixels is {limits.max_pixels})"


_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_ICC_MODES = {"RGB": "RGB", "RGBA": "RGBA", "CMYK": "RGB", "L": "RGB"}
"""Image modes whose ICC profile is applied, and the mode each becomes in sRGB."""


@functools.lru_cache(maxsize=16)
def _srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """A transform from the `icc` profile to sRGB for `mode` images; None when it is sRGB already.

    Cached: photos from one camera share a profile. Built without lcms's one-pixel cache, so that
    decoding threads can share it.
    """
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    if mode == "RGB" and "srgb" in ImageCms.getProfileDescription(source).lower().replace(" ", ""):
        return None  # the common case: nothing to convert
    return ImageCms.buildTransform(source, _SRGB, mode, _ICC_MODES[mode], flags=ImageCms.Flags.NOCACHE)


def _to_srgb(img: Image.Image) -> Image.Image:
    """`img` converted to sRGB through its embedded ICC profile; unchanged without one, or when the
    profile is broken or does not fit the pixels (those are kept as stored rather than refused)."""
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in _ICC_MODES:
        return img
    try:
        transform = _srgb_transform(bytes(icc), img.mode)
        return img if transform is None else transform.apply(img)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """The loaded image as RGB: EXIF orientation applied, ICC profile to sRGB, 16-bit scaled down,
    alpha composited on white."""
    # Broken EXIF metadata: keep the stored orientation rather than refuse the pixels. In place: no copy
    # when there is nothing to rotate.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(img, in_place=True)
    oriented = _to_srgb(img)
    if oriented.mode.startswith("I"):  # 16-bit greyscale PNG ("I;16", "I")
        oriented = oriented.convert("I").point(lambda v: v / 256).convert("L")
    if oriented.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in oriented.info:
        rgba = oriented.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return oriented if oriented.mode == "RGB" else oriented.convert("RGB")


def _detected_format(data: bytes) -> str | None:
    """The format PIL recognises in bytes refused by the PNG/JPEG/WebP openers (only the header is read)."""
    try:
        with Image.open(io.BytesIO(data)) as other:
            return other.format
    except Exception:
        return None


def _decode_base64(text: str, field: str, limits: ImageLimits) -> bytes:
    """Base64 text (standard or URL-safe alphabet, optional padding, whitespace such as MIME line breaks
    tolerated) to bytes; the decoded size is checked against max_bytes before decoding."""
    estimate = _decoded_size(text, len(text))
    if estimate > limits.max_bytes:
        # Whitespace does not count: measure without it before refusing (only on this path: it costs a pass).
        estimate = _decoded_size(text, len(text) - sum(text.count(c) for c in _WHITESPACE))
        if estimate > limits.max_bytes:
            raise PayloadTooLarge(
                f"image is about {estimate} bytes, over max_image_bytes ({limits.max_bytes})", field=field
            )
    data = _strict_b64decode(text)
    if data is None and any(c in text for c in _WHITESPACE):
        data = _strict_b64decode("".join(text.split()))
    if data is None:
        raise InvalidInput("image is not valid base64 (nor a data URI or an http(s) URL)", field=field)
    if not data:
        raise InvalidInput("image is empty", field=field)
    return data


def _decoded_size(text: str, length: int) -> int:
    """Bytes that `length` base64 characters (ending like `text`) decode to."""
    padding = text.rstrip()[-2:].count("=")
    return length // 4 * 3 + max(0, length % 4 - 1) - padding


def _strict_b64decode(text: str) -> bytes | None:
    """Strict base64 (validated in C by binascii), None if invalid."""
    if len(text) % 4:
        text += "=" * (-len(text) % 4)
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        return None
    if b"-" in raw or b"_" in raw:
        raw = raw.translate(_URLSAFE_TO_STANDARD)
    try:
        return binascii.a2b_base64(raw, strict_mode=True)
    except binascii.Error:
        return None


def _decode_base64_image(text: str, field: str, limits: ImageLimits) -> Pixels:
    return decode_image(_decode_base64(text, field, limits), field, limits)


def _data_uri_payload(ref: str, field: str) -> str:
    """The base64 part of `data:[<media type>][;params];base64,<data>`."""
    header, comma, payload = ref.partition(",")
    if not comma:
        raise InvalidInput("malformed data URI: no ',' before the data", field=field)
    params = [p.strip().lower() for p in header[5:].split(";")]
    if "base64" not in params[1:]:
        raise InvalidInput("data URI must be base64-encoded (data:image/png;base64,...)", field=field)
    return payload


# --- loading -------------------------------------------------------------------------------------


async def load_image(ref: str, field: str, limits: ImageLimits) -> Pixels:
    """Decode one image reference: raw base64, a base64 data URI, or an http(s) URL."""
    if ref[:1].isspace() or ref[-1:].isspace():
        ref = ref.strip()
    if not ref:
        raise InvalidInput("image is empty", field=field)
    scheme = _SCHEME.match(ref)
    if scheme is None:
        return await anyio.to_thread.run_sync(_decode_base64_image, ref, field, limits)
    name = scheme.group(1).lower()
    if name == "data":
        payload = _data_uri_payload(ref, field)
        return await anyio.to_thread.run_sync(_decode_base64_image, payload, field, limits)
    if name in ("http", "https"):
        data = await fetch_url(ref, field, limits)
        return await anyio.to_thread.run_sync(decode_image, data, field, limits)
    raise InvalidInput(f"unsupported URL scheme {name!r}; use http(s), a base64 data URI or base64", field=field)


async def load_images(refs: list[str], field: str, limits: ImageLimits) -> list[Pixels]:
    """Decode a list of image references concurrently (at most MAX_CONCURRENT_LOADS at a time), in order.

    The field of item i is `f"{field}[{i}]"`; when items fail, the error of the lowest failing index
    among those seen is raised and the other loads are cancelled.
    """
    if len(refs) == 1:
        return [await load_image(refs[0], f"{field}[0]", limits)]  # max_image_pixels <= max_request_pixels
    results: list[Pixels | None] = [None] * len(refs)
    failures: dict[int, ModelMoraError] = {}
    limiter = anyio.CapacityLimiter(MAX_CONCURRENT_LOADS)
    total = 0

    async def one(index: int, ref: str) -> None:
        nonlocal total
        async with limiter:
            try:
                pixels = await load_image(ref, f"{field}[{index}]", limits)
                total += pixels.width * pixels.height
                if total > limits.max_request_pixels:
                    raise PayloadTooLarge(
                        f"the images of this request exceed {limits.max_request_pixels} pixels together"
                        " (max_request_pixels)",
                        field=field,
                    )
                results[index] = pixels
            except ModelMoraError as exc:
                failures[index] = exc
                tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for index, ref in enumerate(refs):
            tg.start_soon(one, index, ref)
    if failures:
        raise failures[min(failures)]
    return [p for p in results if p is not None]


# --- URL fetching --------------------------------------------------------------------------------


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
