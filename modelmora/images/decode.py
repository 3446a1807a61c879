"""Image bytes to RGB pixels: PNG, JPEG and WebP; base64 and data URIs.

`decode_image` turns encoded bytes into a `Pixels`: RGB uint8 bytes in row-major (height, width, 3)
order, ready to be copied into shared memory for a worker. EXIF orientation is applied, alpha is
composited over white, 16-bit greyscale is scaled down, and an embedded ICC profile (Display P3
photos from phones, Adobe RGB, CMYK print profiles) is honoured: the pixels are converted to sRGB,
the colour space vision models are trained on. `probe_image` reads only the header: the size the
pixels will take, checked against the limits before any pixel is decoded (decompression bombs).

Synchronous and CPU-bound: async callers run these in a worker thread (`load.py` does).
"""

from __future__ import annotations

import binascii
import contextlib
import functools
import io
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from modelmora.errors import InvalidInput, PayloadTooLarge

from .limits import ImageLimits

__all__ = ("Pixels", "data_uri_payload", "decode_base64", "decode_image", "probe_image")

_OPEN_FORMATS = ("PNG", "JPEG", "WEBP")
_ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP"})
"""MPO: a JPEG with extra pictures (many phone cameras); its first picture is used."""
_UNSUPPORTED = "use PNG, JPEG or WebP"
_WHITESPACE = " \t\r\n"
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


@dataclass(frozen=True, slots=True)
class Pixels:
    """A decoded image: RGB, uint8, row-major (height, width, 3)."""

    data: bytes = dataclass_field(repr=False)
    height: int
    width: int


def probe_image(data: bytes, field: str, limits: ImageLimits) -> tuple[int, int]:
    """The (width, height) of PNG/JPEG/WebP bytes, read from the header and checked against the limits.

    Raises:
        PayloadTooLarge: over max_image_bytes or max_image_pixels.
        InvalidInput: empty, another format, or not an image.
    """
    with _opened(data, field, limits) as img:
        return img.size


def decode_image(data: bytes, field: str, limits: ImageLimits) -> Pixels:
    """Decode PNG/JPEG/WebP bytes to RGB pixels (EXIF orientation applied, alpha over white).

    Synchronous and CPU-bound: async callers run it in a thread (`load_image` does).

    Raises:
        PayloadTooLarge: over max_image_bytes or max_image_pixels.
        InvalidInput: empty, another format, corrupt or truncated.
    """
    with _opened(data, field, limits) as img:
        try:
            img.load()
            rgb = _to_rgb(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise PayloadTooLarge(_bomb_message(exc, limits), field=field) from exc
        except MemoryError:
            raise
        except Exception as exc:
            raise InvalidInput("image data is corrupt or truncated", field=field) from exc
    return Pixels(data=rgb.tobytes(), height=rgb.height, width=rgb.width)


@contextlib.contextmanager
def _opened(data: bytes, field: str, limits: ImageLimits) -> Iterator[Image.Image]:
    """The image opened from `data` (header read, no pixel decoded), its size and format checked; PIL's
    errors while opening become our errors."""
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"image is {len(data)} bytes, over max_image_bytes ({limits.max_bytes})", field=field)
    if not data:
        raise InvalidInput("image is empty", field=field)
    try:
        img = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
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
    with img:
        if img.format not in _ACCEPTED_FORMATS:  # pragma: no cover - formats= already restricts it
            raise InvalidInput(f"unsupported image format {img.format}; {_UNSUPPORTED}", field=field)
        width, height = img.size
        if width * height > limits.max_pixels:
            raise PayloadTooLarge(
                f"image is {width}x{height} pixels, over max_image_pixels ({limits.max_pixels})", field=field
            )
        yield img


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


def decode_base64(text: str, field: str, limits: ImageLimits) -> bytes:
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


def data_uri_payload(ref: str, field: str) -> str:
    """The base64 part of `data:[<media type>][;params];base64,<data>`."""
    header, comma, payload = ref.partition(",")
    if not comma:
        raise InvalidInput("malformed data URI: no ',' before the data", field=field)
    params = [p.strip().lower() for p in header[5:].split(";")]
    if "base64" not in params[1:]:
        raise InvalidInput("data URI must be base64-encoded (data:image/png;base64,...)", field=field)
    return payload
