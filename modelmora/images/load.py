"""Image references (base64, data URIs, http(s) URLs; from binary protocols also encoded bytes and
raw pixels) of a request to decoded pixels.

`load_images` runs in three steps, each image of a step concurrently (at most MAX_CONCURRENT_LOADS
at a time, in worker threads for the CPU work): read every image's encoded bytes and header (sizes
checked, nothing decoded); take the request's pixels from the server-wide `PixelBudget`, if one is
given (waiting within the deadline); decode. The result holds the lease until the caller releases it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Literal, TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import checkpoint_if_cancelled

from modelmora.errors import InvalidInput, ModelMoraError, PayloadTooLarge

from .budget import PixelBudget, PixelLease
from .decode import Pixels, data_uri_payload, decode_base64, decode_image, probe_image
from .fetch import fetch_url
from .limits import ImageLimits

__all__ = ("MAX_CONCURRENT_LOADS", "ImageRef", "LoadedImages", "check_pixels", "load_image", "load_images")

MAX_CONCURRENT_LOADS = 8
"""Images of one request fetched/decoded at the same time by `load_images`."""

ImageRef = str | bytes | Pixels
"""One image of a request: a string (base64, data URI, http(s) URL), the bytes of a PNG, JPEG or WebP
file, or raw RGB pixels (a binary protocol's compact forms)."""

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]{0,31}):")
_T = TypeVar("_T")


class LoadedImages(list[Pixels]):
    """The decoded images of one request, in order, holding their pixels in the server's budget until
    `release()` (or the end of a `with` block): release when the request is answered."""

    __slots__ = ("lease",)

    def __init__(self, pixels: Iterable[Pixels] = (), lease: PixelLease | None = None) -> None:
        super().__init__(pixels)
        self.lease = lease

    def release(self) -> None:
        """Give the pixels back to the budget (once; later calls do nothing)."""
        if self.lease is not None:
            self.lease.release()

    def __enter__(self) -> LoadedImages:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


async def load_image(ref: str, field: str, limits: ImageLimits) -> Pixels:
    """Decode one image reference: raw base64, a base64 data URI, or an http(s) URL (no pixel budget)."""
    kind, text = _source(ref, field)
    if kind == "base64":
        return await anyio.to_thread.run_sync(_decode_base64_image, text, field, limits)
    data = await fetch_url(text, field, limits)
    return await anyio.to_thread.run_sync(decode_image, data, field, limits)


async def load_images(
    refs: Sequence[ImageRef],
    field: str,
    limits: ImageLimits,
    *,
    budget: PixelBudget | None = None,
    deadline: float = math.inf,
) -> LoadedImages:
    """Decode a list of image references, in order, within the request's and the server's pixel limits.

    The field of item i is `f"{field}[{i}]"`; when items fail, the error of the lowest failing index
    among those seen is raised and the other loads are cancelled. The request's pixels (from the
    headers) are checked against max_request_pixels, then taken from `budget` before any is decoded.

    Args:
        refs: the image references.
        field: the JSON path of the list, for errors.
        limits: the server's image limits.
        budget: the server-wide pixel budget; None: no budget (the caller bounds concurrency).
        deadline: how long to wait for room in `budget`, on `anyio.current_time()`'s clock.

    Returns:
        The images, holding their lease on `budget`: call `release()` when the request is answered.
        On an error or a cancellation nothing stays leased.

    Raises:
        InvalidInput: an image is invalid (named by its field).
        PayloadTooLarge: an image, or the request's images together, over a limit.
        ImageBudgetExhausted: no room in `budget` before `deadline`.
    """
    if not refs:
        return LoadedImages()
    fields = [f"{field}[{i}]" for i in range(len(refs))]

    async def read(index: int) -> tuple[bytes | Pixels, int]:
        ref = refs[index]
        if isinstance(ref, Pixels):
            check_pixels(ref, fields[index], limits)
            return ref, ref.width * ref.height
        if isinstance(ref, bytes):
            width, height = await anyio.to_thread.run_sync(probe_image, ref, fields[index], limits)
            return ref, width * height
        kind, text = _source(ref, fields[index])
        if kind == "base64":
            return await anyio.to_thread.run_sync(_read_base64, text, fields[index], limits)
        data = await fetch_url(text, fields[index], limits)
        width, height = await anyio.to_thread.run_sync(probe_image, data, fields[index], limits)
        return data, width * height

    encoded = await _each(len(refs), read)
    total = sum(pixels for _, pixels in encoded)
    if total > limits.max_request_pixels:
        raise PayloadTooLarge(
            f"the images of this request are {total} pixels together, over max_request_pixels"
            f" ({limits.max_request_pixels})",
            field=field,
        )
    lease = await budget.acquire(total, deadline) if budget is not None else None
    try:

        async def decode(index: int) -> Pixels:
            data = encoded[index][0]
            encoded[index] = (b"", 0)  # the pixels replace the encoded bytes
            if isinstance(data, Pixels):
                return data
            return await anyio.to_thread.run_sync(decode_image, data, fields[index], limits)

        loaded = LoadedImages(await _each(len(refs), decode), lease)
        await checkpoint_if_cancelled()  # cancelled during the last decode (on trio it ends without raising)
        return loaded
    except BaseException:
        if lease is not None:
            lease.release()
        raise


async def _each(count: int, step: Callable[[int], Awaitable[_T]]) -> list[_T]:
    """`step(i)` for every index, at most MAX_CONCURRENT_LOADS at once, results in order; the first
    failures cancel the rest and the lowest failing index's error is raised."""
    results: list[_T | None] = [None] * count
    failures: dict[int, ModelMoraError] = {}
    limiter = anyio.CapacityLimiter(MAX_CONCURRENT_LOADS)

    async def one(index: int) -> None:
        async with limiter:
            try:
                results[index] = await step(index)
            except ModelMoraError as exc:
                failures[index] = exc
                tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for index in range(count):
            tg.start_soon(one, index)
    if failures:
        raise failures[min(failures)]
    return [r for r in results if r is not None]


def check_pixels(image: Pixels, field: str, limits: ImageLimits) -> None:
    """Check raw pixels: a size that matches their shape, within max_image_pixels.

    Raises:
        InvalidInput: no pixels, or a byte length other than height x width x 3.
        PayloadTooLarge: over max_image_pixels.
    """
    if image.width <= 0 or image.height <= 0:
        raise InvalidInput(f"raw image of {image.width}x{image.height} pixels has no pixels", field=field)
    if image.width * image.height > limits.max_pixels:
        raise PayloadTooLarge(
            f"image is {image.width}x{image.height} pixels, over max_image_pixels ({limits.max_pixels})", field=field
        )
    expected = image.width * image.height * 3
    if len(image.data) != expected:
        raise InvalidInput(
            f"raw RGB image of {image.width}x{image.height} pixels needs {expected} bytes, got {len(image.data)}",
            field=field,
        )


def _source(ref: str, field: str) -> tuple[Literal["base64", "url"], str]:
    """Where an image reference's bytes are: ("base64", the base64 text) or ("url", an http(s) URL)."""
    if ref[:1].isspace() or ref[-1:].isspace():
        ref = ref.strip()
    if not ref:
        raise InvalidInput("image is empty", field=field)
    scheme = _SCHEME.match(ref)
    if scheme is None:
        return "base64", ref
    name = scheme.group(1).lower()
    if name == "data":
        return "base64", data_uri_payload(ref, field)
    if name in ("http", "https"):
        return "url", ref
    raise InvalidInput(f"unsupported URL scheme {name!r}; use http(s), a base64 data URI or base64", field=field)


def _read_base64(text: str, field: str, limits: ImageLimits) -> tuple[bytes, int]:
    """Base64 text to the image's bytes and its pixel count (from the header), in one thread hop."""
    data = decode_base64(text, field, limits)
    width, height = probe_image(data, field, limits)
    return data, width * height


def _decode_base64_image(text: str, field: str, limits: ImageLimits) -> Pixels:
    return decode_image(decode_base64(text, field, limits), field, limits)
