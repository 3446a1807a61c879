"""The image limits of one server, taken from `Settings`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelmora.config import Settings

__all__ = ("ImageLimits",)


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """The image limits of one server (see `Settings`).

    `max_bytes` bounds the encoded image (checked on the base64 length before decoding it, and on the
    stream while fetching); `max_pixels` bounds width x height and is checked from the image header
    before any pixel is decoded (decompression bombs).
    """

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
