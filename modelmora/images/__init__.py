"""Image inputs (img2embed, img2txt): base64, data URIs and http(s) URLs to raw RGB pixels.

An image reference is a string: raw base64 (standard or URL-safe alphabet, whitespace and missing
padding tolerated), a data URI (`data:image/png;base64,...`), or an http(s) URL. The result is a
`Pixels`: RGB uint8 bytes in row-major (height, width, 3) order, ready to be copied into shared
memory for a worker. Only PNG, JPEG and WebP are accepted.

One concept per module:
- `limits`: `ImageLimits`, the server's limits (bytes, pixels per image and per request, fetches);
- `decode`: bytes to pixels (EXIF orientation, ICC profiles to sRGB, alpha), base64 and data URIs;
- `fetch`: http(s) URLs, refusing private addresses after DNS resolution and on every redirect;
- `budget`: `PixelBudget`, the decoded pixels of all requests together, server-wide;
- `load`: `load_images`, a request's references to pixels within the limits and the budget.
"""

from __future__ import annotations

from .budget import PixelBudget, PixelBudgetStatistics, PixelLease
from .decode import Pixels, decode_image, probe_image
from .fetch import MAX_REDIRECTS, Resolver, fetch_url, is_public_address, system_resolve
from .limits import ImageLimits
from .load import MAX_CONCURRENT_LOADS, ImageRef, LoadedImages, check_pixels, load_image, load_images

__all__ = (
    "MAX_CONCURRENT_LOADS",
    "MAX_REDIRECTS",
    "ImageLimits",
    "ImageRef",
    "LoadedImages",
    "PixelBudget",
    "PixelBudgetStatistics",
    "PixelLease",
    "Pixels",
    "Resolver",
    "check_pixels",
    "decode_image",
    "fetch_url",
    "is_public_address",
    "load_image",
    "load_images",
    "probe_image",
    "system_resolve",
)
