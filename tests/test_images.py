"""Image inputs: base64 / data URI / URL references to raw RGB pixels, with limits and SSRF checks."""

from __future__ import annotations

import base64
import contextlib
import io
import ipaddress
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import warnings
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageCms, ImageOps

from modelmora import images
from modelmora.config import Settings
from modelmora.errors import InvalidInput, PayloadTooLarge
from modelmora.images import ImageLimits, Pixels, decode_image, fetch_url, load_image, load_images
from modelmora.images import decode as image_decode
from modelmora.images import load as image_load

FIELD = "$.input_data.image"
PRIVATE_MESSAGE = "image URL resolves to a private/loopback/link-local address; set allow_private_urls to allow it"

# A 3x2 image with known colours, row by row.
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (10, 20, 30)]
EXPECTED = bytes(c for rgb in COLOURS for c in rgb)


def limits(**overrides: Any) -> ImageLimits:
    base = ImageLimits.from_settings(Settings())
    return ImageLimits(**{**{f: getattr(base, f) for f in base.__slots__}, **overrides})


PRIVATE_OK = limits(allow_private_urls=True)


def known_image() -> Image.Image:
    img = Image.new("RGB", (3, 2))
    img.putdata(COLOURS)
    return img


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PNG = encode(known_image(), "PNG")


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def bomb_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A 1-bit greyscale PNG of all zeros declaring width x height (`rows` of data; None: all of them)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    comp = zlib.compressobj(9)
    rows = height if rows is None else rows
    row = b"\0" * (1 + (width + 7) // 8)
    idat = b"".join(comp.compress(row * min(1000, rows - i)) for i in range(0, rows, 1000)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def near(actual: Sequence[int], expected: Sequence[int], tolerance: int = 6) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def pixel(p: Pixels, x: int, y: int) -> tuple[int, ...]:
    i = (y * p.width + x) * 3
    return tuple(p.data[i : i + 3])


# --- decoding ------------------------------------------------------------------------------------


def test_limits_from_settings() -> None:
    s = Settings(max_image_bytes=11, max_image_pixels=22, url_fetch_timeout_s=3.5, allow_private_urls=True)
    assert ImageLimits.from_settings(s) == ImageLimits(11, 22, 3.5, True)


def test_png_exact_pixels() -> None:
    p = decode_image(PNG, FIELD, limits())
    assert (p.width, p.height) == (3, 2)
    assert p.data == EXPECTED
    assert "data" not in repr(p)


def test_webp_lossless_exact_pixels() -> None:
    p = decode_image(encode(known_image(), "WEBP", lossless=True), FIELD, limits())
    assert (p.width, p.height, p.data) == (3, 2, EXPECTED)


def test_jpeg_matches_reference_decoder() -> None:
    img = Image.new("RGB", (64, 48), (200, 30, 90))
    data = encode(img, "JPEG", quality=95)
    p = decode_image(data, FIELD, limits())
    assert (p.width, p.height) == (64, 48)
    assert p.data == Image.open(io.BytesIO(data)).convert("RGB").tobytes()
    assert near(pixel(p, 10, 10), (200, 30, 90))


def test_cmyk_jpeg_to_rgb() -> None:
    p = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), FIELD, limits())
    assert (p.width, p.height, len(p.data)) == (8, 8, 8 * 8 * 3)
    assert near(pixel(p, 4, 4), (255, 0, 0), tolerance=8)


# sRGB's primaries adapted to D50, as in the sRGB ICC profiles
SRGB_PRIMARIES = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))


def rgb_icc(primaries: Sequence[Sequence[float]], gamma: float = 2.2, description: str = "test RGB") -> bytes:
    """A minimal ICC v2 display profile: a matrix (the red, green and blue primaries in XYZ) and one
    gamma curve per channel. Enough to tag an image with a colour space other than sRGB."""

    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(v: Sequence[float]) -> bytes:
        return b"XYZ \0\0\0\0" + b"".join(s15(c) for c in v)

    ascii_desc = description.encode() + b"\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(ascii_desc)) + ascii_desc + bytes(4 + 4 + 2 + 1 + 67)
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256))
    d50 = (0.9642, 1.0, 0.8249)
    tags = [
        (b"desc", desc),
        (b"cprt", b"text\0\0\0\0public domain\0"),
        (b"wtpt", xyz(d50)),
        (b"rXYZ", xyz(primaries[0])),
        (b"gXYZ", xyz(primaries[1])),
        (b"bXYZ", xyz(primaries[2])),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        body += bytes(-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = struct.pack(
        ">I4sI4s4s4s6H4s", size, b"\0" * 4, 0x02100000, b"mntr", b"RGB ", b"XYZ ", 2026, 1, 1, 0, 0, 0, b"acsp"
    )
    header += bytes(4 + 4 + 4 + 4 + 8 + 4) + b"".join(s15(c) for c in d50)
    header += bytes(128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + data


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_icc_profile_is_converted_to_srgb(fmt: str) -> None:
    # a colour space whose red primary is sRGB's green and the other way round
    swapped = rgb_icc((SRGB_PRIMARIES[1], SRGB_PRIMARIES[0], SRGB_PRIMARIES[2]))
    img = Image.new("RGB", (8, 8), (255, 0, 0))
    options: dict[str, Any] = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    p = decode_image(encode(img, fmt, icc_profile=swapped, **options), FIELD, limits())
    assert near(pixel(p, 4, 4), (0, 255, 0), tolerance=12)
    # the same colour space with the primaries in place: about sRGB (its gamma is 2.2, not sRGB's curve)
    same = rgb_icc(SRGB_PRIMARIES, description="not quite sRGB")
    q = decode_image(encode(Image.new("RGB", (8, 8), (255, 128, 0)), "PNG", icc_profile=same), FIELD, limits())
    assert near(pixel(q, 4, 4), (255, 128, 0), tolerance=8)


def test_srgb_and_broken_profiles_keep_the_pixels() -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    broken = rgb_icc(SRGB_PRIMARIES)[:100]
    gray_profile_on_rgb = bytearray(rgb_icc(SRGB_PRIMARIES))
    gray_profile_on_rgb[16:20] = b"GRAY"  # a profile for other pixels than the image has
    for icc in (srgb, broken, bytes(gray_profile_on_rgb)):
        p = decode_image(encode(known_image(), "PNG", icc_profile=icc), FIELD, limits())
        assert p.data == EXPECTED


def test_cmyk_jpeg_with_a_profile_keeps_its_colour() -> None:
    img = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    data = encode(img, "JPEG", icc_profile=b"\0" * 64)  # a CMYK profile we cannot parse: the plain conversion
    assert near(pixel(decode_image(data, FIELD, limits()), 4, 4), (255, 0, 0), tolerance=8)


def test_rgba_composited_on_white() -> None:
    img = Image.new("RGBA", (2, 1))
    img.putdata([(255, 0, 0, 0), (0, 0, 0, 128)])
    for data in (encode(img, "PNG"), encode(img, "WEBP", lossless=True, exact=True)):
        p = decode_image(data, FIELD, limits())
        assert pixel(p, 0, 0) == (255, 255, 255)
        assert near(pixel(p, 1, 0), (127, 127, 127), tolerance=1)


@pytest.mark.parametrize(
    ("img", "expected"),
    [
        (Image.new("L", (2, 2), 77), (77, 77, 77)),
        (Image.new("LA", (2, 2), (0, 0)), (255, 255, 255)),
        (Image.new("1", (2, 2), 1), (255, 255, 255)),
        (Image.new("I;16", (2, 2), 40000), (156, 156, 156)),
        (Image.new("RGB", (2, 2), (200, 100, 50)).convert("P", palette=Image.Palette.ADAPTIVE), (200, 100, 50)),
    ],
    ids=["grey", "grey-alpha", "1bit", "grey16", "palette"],
)
def test_modes_converted_to_rgb(img: Image.Image, expected: tuple[int, int, int]) -> None:
    p = decode_image(encode(img, "PNG"), FIELD, limits())
    assert (p.width, p.height) == (2, 2)
    assert p.data == bytes(expected) * 4


def test_palette_with_transparency() -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255])
    img.putdata([0, 1])
    p = decode_image(encode(img, "PNG", transparency=0), FIELD, limits())
    assert p.data == bytes([255, 255, 255, 0, 0, 255])


def test_exif_orientation_applied() -> None:
    img = Image.new("RGB", (32, 16), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 16, 16))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the left half goes to the top
    p = decode_image(encode(img, "JPEG", quality=95, exif=exif.tobytes()), FIELD, limits())
    assert (p.width, p.height) == (16, 32)
    assert near(pixel(p, 8, 4), (255, 0, 0), tolerance=12)
    assert near(pixel(p, 8, 28), (0, 0, 255), tolerance=12)


def test_broken_exif_keeps_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(image: Image.Image, **kwargs: Any) -> Image.Image:
        raise SyntaxError("bad EXIF")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    assert decode_image(PNG, FIELD, limits()).data == EXPECTED


def test_memory_error_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    def exhausted(img: Image.Image) -> Image.Image:
        raise MemoryError

    monkeypatch.setattr(image_decode, "_to_rgb", exhausted)
    with pytest.raises(MemoryError):
        decode_image(PNG, FIELD, limits())


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_unsupported_formats_refused(fmt: str) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_image(encode(known_image(), fmt), FIELD, limits())
    assert info.value.message == f"unsupported image format {fmt}; use PNG, JPEG or WebP"
    assert info.value.field == FIELD and info.value.http_status == 422


@pytest.mark.parametrize(
    "data",
    [
        b"not an image at all",
        PNG[: len(PNG) // 2],
        PNG[:40],
        PNG[:30] + bytes([PNG[30] ^ 0xFF]) + PNG[31:],  # IHDR CRC broken
        encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")[:300],
        encode(known_image(), "WEBP")[:30],
        b"\x89PNG\r\n\x1a\n",
        b"",
    ],
    ids=["garbage", "png-half", "png-header", "png-crc", "jpeg-truncated", "webp-truncated", "png-magic", "empty"],
)
def test_corrupt_or_truncated_refused(data: bytes) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_image(data, FIELD, limits())
    assert info.value.field == FIELD and info.value.http_status == 422


def test_encoded_bytes_over_limit() -> None:
    with pytest.raises(PayloadTooLarge) as info:
        decode_image(PNG, FIELD, limits(max_bytes=len(PNG) - 1))
    assert "max_image_bytes" in info.value.message and info.value.field == FIELD
    assert info.value.http_status == 413
    assert decode_image(PNG, FIELD, limits(max_bytes=len(PNG))).data == EXPECTED


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A complete ~110 KB PNG that decodes to 30000 x 30000 pixels."""
    return bomb_png(30000, 30000)


def test_decompression_bomb_refused_fast(bomb: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    def no_pixels(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels decoded: the header alone should have decided")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_pixels)
    assert len(bomb) < 200_000
    with pytest.raises(PayloadTooLarge) as info:
        decode_image(bomb, FIELD, limits())
    assert info.value.message == "image has more pixels than max_image_pixels (16777216)"  # PIL's guard, first
    assert info.value.field == FIELD
    with pytest.raises(PayloadTooLarge) as info:  # under PIL's guard, over ours: refused from the header
        decode_image(bomb_png(5000, 5000), FIELD, limits())
    assert info.value.message == "image is 5000x5000 pixels, over max_image_pixels (16777216)"


def test_pixel_limit_is_inclusive() -> None:
    assert decode_image(PNG, FIELD, limits(max_pixels=6)).data == EXPECTED
    with pytest.raises(PayloadTooLarge, match="max_image_pixels"):
        decode_image(PNG, FIELD, limits(max_pixels=5))


def test_pil_bomb_guard_also_refused(bomb: bytes) -> None:
    """With max_image_pixels set above PIL's own limit, PIL's DecompressionBombError is a 413 too."""
    pil = Image.MAX_IMAGE_PIXELS
    assert pil is not None
    with pytest.raises(PayloadTooLarge) as info:
        decode_image(bomb, FIELD, limits(max_pixels=10**12))
    assert (
        info.value.message == f"image has more pixels than the decoder allows ({2 * pil}; max_image_pixels is {10**12})"
    )
    assert isinstance(info.value.__cause__, Image.DecompressionBombError)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(PayloadTooLarge) as info:
            decode_image(bomb_png(10000, 10000, rows=1), FIELD, limits(max_pixels=10**12))
        assert (
            info.value.message == f"image has more pixels than the decoder allows ({pil}; max_image_pixels is {10**12})"
        )


# --- base64 and data URIs ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_base64_and_data_uris() -> None:
    webp = encode(known_image(), "WEBP", lossless=True)
    refs = [
        b64(PNG),
        f"data:image/png;base64,{b64(PNG)}",
        f"DATA:image/webp;charset=x;BASE64,{b64(webp)}",
        f"data:;base64,{b64(PNG)}",
        "\n".join(b64(PNG)[i : i + 76] for i in range(0, len(b64(PNG)), 76)),  # MIME line breaks
        b64(PNG).rstrip("="),  # padding dropped
        base64.urlsafe_b64encode(PNG).decode(),
        f"  {b64(PNG)}\n",
    ]
    for ref in refs:
        p = await load_image(ref, FIELD, limits())
        assert (p.width, p.height, p.data) == (3, 2, EXPECTED), ref[:40]


@pytest.mark.anyio
async def test_jpeg_data_uri() -> None:
    data = encode(Image.new("RGB", (20, 10), (10, 200, 10)), "JPEG")
    p = await load_image(f"data:image/jpeg;base64,{b64(data)}", FIELD, limits())
    assert (p.width, p.height) == (20, 10) and near(pixel(p, 5, 5), (10, 200, 10))


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("!!!not base64!!!", "not valid base64"),
        ("iVBORw0KGgo=AAAA", "not valid base64"),
        ("ÿÿÿÿ", "not valid base64"),
        ("A", "not valid base64"),
        ("====", "not valid base64"),
        ("", "image is empty"),
        ("   ", "image is empty"),
        ("data:image/png," + b64(PNG), "must be base64-encoded"),
        ("data:image/png;base64,", "image is empty"),
        ("data:image/png;base64" + b64(PNG), "malformed data URI"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("ftp://example.com/a.png", "unsupported URL scheme 'ftp'"),
        ("file:///etc/passwd", "unsupported URL scheme 'file'"),
        ("gopher://127.0.0.1:6379/_INFO", "unsupported URL scheme 'gopher'"),
        (b64(b"GIF89a" + b"\0" * 40), "not a valid PNG, JPEG or WebP"),
    ],
)
async def test_bad_references_refused(ref: str, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        await load_image(ref, FIELD, limits())
    assert message in info.value.message and info.value.field == FIELD


@pytest.mark.anyio
async def test_base64_over_limit_refused_before_decoding() -> None:
    # Invalid base64 at the very end: a 413 (not a 422) shows the length was checked first.
    with pytest.raises(PayloadTooLarge) as info:
        await load_image("A" * 4000 + "!", FIELD, limits(max_bytes=1000))
    assert "max_image_bytes" in info.value.message and info.value.field == FIELD
    with pytest.raises(PayloadTooLarge):
        await load_image(f"data:image/png;base64,{b64(PNG)}", FIELD, limits(max_bytes=len(PNG) - 1))
    assert (await load_image(b64(PNG), FIELD, limits(max_bytes=len(PNG)))).data == EXPECTED


# --- load_images ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_load_images_in_order() -> None:
    jpeg = encode(Image.new("RGB", (5, 7), (0, 0, 0)), "JPEG")
    out = await load_images([b64(PNG), b64(jpeg), f"data:image/png;base64,{b64(PNG)}"], FIELD, limits())
    assert [(p.width, p.height) for p in out] == [(3, 2), (5, 7), (3, 2)]
    assert out[0].data == out[2].data == EXPECTED
    assert await load_images([], FIELD, limits()) == []
    assert (await load_images([b64(PNG)], FIELD, limits()))[0].data == EXPECTED


@pytest.mark.anyio
async def test_load_images_names_failing_item() -> None:
    refs = [b64(PNG), b64(encode(known_image(), "GIF")), b64(PNG)]
    with pytest.raises(InvalidInput) as info:
        await load_images(refs, FIELD, limits())
    assert info.value.field == "$.input_data.image[1]"
    assert "unsupported image format GIF" in info.value.message
    with pytest.raises(InvalidInput) as info:
        await load_images(["bad!"], FIELD, limits())
    assert info.value.field == "$.input_data.image[0]"
    with pytest.raises(PayloadTooLarge) as too_large:
        await load_images([b64(PNG)] * 5 + [b64(bomb_png(5000, 5000, rows=1))], FIELD, limits())
    assert too_large.value.field == "$.input_data.image[5]"


@pytest.mark.anyio
async def test_load_images_bounded_concurrency(monkeypatch: pytest.MonkeyPatch) -> None:
    active = peak = 0
    lock = threading.Lock()
    original = image_load.decode_image

    def tracked(data: bytes, field: str, lim: ImageLimits) -> Pixels:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.02)
        with lock:
            active -= 1
        return original(data, field, lim)

    monkeypatch.setattr(image_load, "decode_image", tracked)
    out = await load_images([b64(PNG)] * 24, FIELD, limits())
    assert len(out) == 24 and all(p.data == EXPECTED for p in out)
    assert 2 <= peak <= images.MAX_CONCURRENT_LOADS


# --- a local HTTP server -------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.connections = 0
        self.paths: list[str] = []
        self.sni: list[str | None] = []
        self.release = threading.Event()

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections += 1
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that stop reading at a limit break the pipe: expected


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {"Content-Length": str(len(body))}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        match self.path:
            case "/img.png":
                self._send(200, PNG, {"Content-Length": str(len(PNG)), "Content-Type": "image/png"})
            case "/redirect":
                self._send(302, headers={"Location": "/img.png", "Content-Length": "0"})
            case "/loop":
                self._send(307, headers={"Location": "/loop", "Content-Length": "0"})
            case "/big":
                self._send(200, b"x" * 10_000)
            case "/big-stream":  # HTTP/1.0, no Content-Length: the body ends when the connection closes
                self._send(200, headers={"Content-Type": "image/png"})
                for _ in range(20):
                    self.wfile.write(b"x" * 1000)
                    self.wfile.flush()
            case "/slow":
                self.server.release.wait(10)
                self._send(200, PNG)
            case _:
                self._send(404, b"not found")


@dataclass
class LocalServer:
    server: _Server
    port: int
    scheme: str = "http"

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


@contextlib.contextmanager
def serving(server: _Server, scheme: str = "http") -> Iterator[LocalServer]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield LocalServer(server, server.server_address[1], scheme)
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def http_server() -> Iterator[LocalServer]:
    with serving(_Server(_Handler)) as local:
        yield local


@pytest.mark.anyio
async def test_url_fetch_exact_pixels(http_server: LocalServer) -> None:
    assert await fetch_url(http_server.url("/img.png"), FIELD, PRIVATE_OK) == PNG
    p = await load_image(http_server.url("/img.png"), FIELD, PRIVATE_OK)
    assert (p.width, p.height, p.data) == (3, 2, EXPECTED)
    p = await load_image(http_server.url("/redirect", host="localhost"), FIELD, PRIVATE_OK)
    assert p.data == EXPECTED
    assert http_server.server.paths == ["/img.png", "/img.png", "/redirect", "/img.png"]
    out = await load_images([b64(PNG), http_server.url("/img.png")], FIELD, PRIVATE_OK)
    assert [p.data for p in out] == [EXPECTED, EXPECTED]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "[::1]", "10.0.0.1", "169.254.169.254", "0.0.0.0", "[::ffff:127.0.0.1]", "127.1"],
)
async def test_private_addresses_refused_before_connecting(http_server: LocalServer, host: str) -> None:
    with pytest.raises(InvalidInput) as info:
        await load_image(http_server.url("/img.png", host=host), FIELD, limits())
    assert info.value.message == PRIVATE_MESSAGE and info.value.field == FIELD
    assert http_server.server.connections == 0


@pytest.mark.anyio
async def test_http_errors(http_server: LocalServer) -> None:
    with pytest.raises(InvalidInput) as info:
        await load_image(http_server.url("/missing"), FIELD, PRIVATE_OK)
    assert info.value.message == "fetching the image URL failed with HTTP 404" and info.value.field == FIELD
    with pytest.raises(InvalidInput, match="redirected more than 5 times"):
        await fetch_url(http_server.url("/loop"), FIELD, PRIVATE_OK)
    assert http_server.server.paths.count("/loop") == 6


# Stopping a body at the limit leaves httpx/httpcore's inner async generators to trio's finalizer,
# which warns (httpx issue #3686); the connection itself is closed by response.aclose().
ABANDONED_HTTPX_GENERATORS = pytest.mark.filterwarnings("ignore:Async generator 'http(x|core)\\.:ResourceWarning")


@ABANDONED_HTTPX_GENERATORS
@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/big", "/big-stream"])
async def test_body_over_limit(http_server: LocalServer, path: str) -> None:
    with pytest.raises(PayloadTooLarge) as info:
        await load_image(http_server.url(path), FIELD, limits(max_bytes=4096, allow_private_urls=True))
    assert "max_image_bytes" in info.value.message and info.value.field == FIELD
    if path == "/big":
        assert "10000 bytes" in info.value.message  # refused from Content-Length, before reading
    # Within the limit, the same bodies are read to the end (and are not images).
    with pytest.raises(InvalidInput, match="not a valid PNG"):
        await load_image(http_server.url(path), FIELD, limits(max_bytes=20_000, allow_private_urls=True))


@pytest.mark.anyio
async def test_slow_server_times_out(http_server: LocalServer) -> None:
    start = time.perf_counter()
    with pytest.raises(InvalidInput) as info:
        await load_image(http_server.url("/slow"), FIELD, limits(fetch_timeout_s=0.3, allow_private_urls=True))
    elapsed = time.perf_counter() - start
    assert info.value.message == "fetching the image URL timed out after 0.3 s" and info.value.field == FIELD
    assert elapsed > 0.25  # it waited for the fetch timeout (pytest's timeout stops a hang)


@pytest.mark.anyio
async def test_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(InvalidInput) as info:
        await fetch_url(f"http://127.0.0.1:{port}/x.png", FIELD, PRIVATE_OK)
    assert info.value.message == "fetching the image URL failed: could not connect"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/a.png", "unsupported scheme 'ftp'"),
        ("file:///etc/passwd", "unsupported scheme 'file'"),
        ("http:///nohost.png", "has no host"),
        ("http://exa mple.com/", "invalid host name"),
        ("http://%41.com/", "invalid host name"),
        ("http://-a.com/", "invalid host name"),
        ("http://[fe80::1%25eth0]/", "invalid host name"),
        ("http://example.com:99999/", "invalid port"),
        ("http://:80/", "has no host"),
        ("https://[::1/", "not a valid URL"),
    ],
)
async def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        await fetch_url(url, FIELD, PRIVATE_OK)
    assert message in info.value.message and info.value.field == FIELD


@pytest.mark.anyio
async def test_system_resolve() -> None:
    assert "127.0.0.1" in await images.system_resolve("localhost", 80)
    assert await images.system_resolve("93.184.216.34", 443) == ["93.184.216.34"]


# --- pinned addresses, redirects and failures (fake resolver and network) ------------------------

PUBLIC_IP = "93.184.216.34"


@dataclass
class FakeNet:
    """A resolver and an httpx transport standing in for DNS and public servers."""

    names: dict[str, list[str]]
    handler: Callable[[httpx.Request], httpx.Response]
    lookups: list[str] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return self.names[host]

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)

    async def fetch(self, url: str, lim: ImageLimits | None = None) -> bytes:
        transport = httpx.MockTransport(self._handle)
        return await fetch_url(url, FIELD, lim or limits(), resolve=self.resolve, transport=transport)


def png_response(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=PNG)


@pytest.mark.anyio
async def test_connects_to_the_checked_address() -> None:
    answers = iter([[PUBLIC_IP], ["127.0.0.1"]])  # a rebinding resolver: only its first answer is used
    net = FakeNet({}, png_response)

    async def rebinding(host: str, port: int) -> list[str]:
        net.lookups.append(f"{host}:{port}")
        return next(answers)

    net.resolve = rebinding  # type: ignore[method-assign]
    assert await net.fetch("https://images.example:8443/cat.png?size=1") == PNG
    assert net.lookups == ["images.example:8443"]
    (request,) = net.requests
    assert str(request.url) == f"https://{PUBLIC_IP}:8443/cat.png?size=1"
    assert request.headers["host"] == "images.example:8443"
    assert request.extensions["sni_hostname"] == "images.example"
    assert request.headers["accept-encoding"] == "identity"


@pytest.mark.anyio
async def test_plain_http_has_no_sni_and_default_port() -> None:
    net = FakeNet({"images.example": ["2606:2800:220:1:248:1893:25c8:1946"]}, png_response)
    assert await net.fetch("http://images.example/cat.png") == PNG
    (request,) = net.requests
    assert str(request.url) == "http://[2606:2800:220:1:248:1893:25c8:1946]/cat.png"
    assert request.headers["host"] == "images.example" and "sni_hostname" not in request.extensions


@pytest.mark.anyio
@pytest.mark.parametrize(
    "location", ["http://internal.example/secret.png", "http://127.0.0.1/img.png", "http://[fd00::1]/img.png"]
)
async def test_redirect_to_private_refused(location: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/start":
            return httpx.Response(302, headers={"Location": location})
        return png_response(request)

    net = FakeNet({"public.example": [PUBLIC_IP], "internal.example": ["10.0.0.5"]}, handler)
    with pytest.raises(InvalidInput) as info:
        await net.fetch("http://public.example/start")
    assert info.value.message == PRIVATE_MESSAGE and info.value.field == FIELD
    assert [r.url.path for r in net.requests] == ["/start"]


@pytest.mark.anyio
async def test_each_hop_resolved_and_checked_again() -> None:
    """A redirect to the same host whose name now resolves privately (rebinding between hops)."""
    answers = iter([[PUBLIC_IP], ["192.168.1.1"]])

    async def rebinding(host: str, port: int) -> list[str]:
        return next(answers)

    net = FakeNet({}, lambda r: httpx.Response(302, headers={"Location": "/next"}))
    net.resolve = rebinding  # type: ignore[method-assign]
    with pytest.raises(InvalidInput, match="private/loopback"):
        await net.fetch("http://public.example/start")
    assert [r.url.path for r in net.requests] == ["/start"]


@pytest.mark.anyio
async def test_redirect_to_private_local_server_never_connects(http_server: LocalServer) -> None:
    net = FakeNet(
        {"public.example": [PUBLIC_IP]},
        lambda r: httpx.Response(301, headers={"Location": http_server.url("/img.png")}),
    )
    with pytest.raises(InvalidInput, match="private/loopback"):
        await net.fetch("http://public.example/start")
    assert http_server.server.connections == 0


@pytest.mark.anyio
async def test_redirects_followed_and_limited() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        hop = int(request.url.path.strip("/") or 0)
        if hop < 5:
            return httpx.Response(303, headers={"Location": f"https://cdn.example/{hop + 1}"})
        return png_response(request)

    net = FakeNet({"public.example": [PUBLIC_IP], "cdn.example": ["2606:4700::1111"]}, handler)
    assert await net.fetch("http://public.example/0") == PNG
    assert [r.headers["host"] for r in net.requests] == ["public.example"] + ["cdn.example"] * 5
    assert net.lookups == ["public.example"] + ["cdn.example"] * 5
    with pytest.raises(InvalidInput, match="redirected more than 5 times"):
        await FakeNet(net.names, handler).fetch("http://public.example/-1")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("names", "message"),
    [
        ({"public.example": [PUBLIC_IP, "10.0.0.1"]}, PRIVATE_MESSAGE),  # any private answer refuses
        ({"public.example": ["::ffff:192.168.0.1"]}, PRIVATE_MESSAGE),
        ({"public.example": ["not-an-address"]}, PRIVATE_MESSAGE),
        ({"public.example": []}, "could not resolve the image URL's host"),
        ({}, "could not resolve the image URL's host"),
    ],
)
async def test_resolution_refusals(names: dict[str, list[str]], message: str) -> None:
    net = FakeNet(names, png_response)
    with pytest.raises(InvalidInput) as info:
        await net.fetch("http://public.example/a.png")
    assert info.value.message == message and net.requests == []


@pytest.mark.anyio
async def test_allow_private_urls() -> None:
    net = FakeNet({"nas.lan": ["192.168.1.10", "fe80::1"]}, png_response)
    assert await net.fetch("http://nas.lan/a.png", PRIVATE_OK) == PNG


def _raise(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


@pytest.mark.anyio
async def test_next_address_after_connect_failure() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "2606:4700::1111":
            raise httpx.ConnectError("network unreachable", request=request)
        return png_response(request)

    net = FakeNet({"public.example": ["2606:4700::1111", PUBLIC_IP]}, handler)
    assert await net.fetch("http://public.example/a.png") == PNG
    assert [r.url.host for r in net.requests] == ["2606:4700::1111", PUBLIC_IP]


class _BrokenStream(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield PNG[:10]
        raise httpx.ReadError("connection reset by peer")


def _tls_error() -> httpx.ConnectError:
    try:
        try:
            raise ssl.SSLCertVerificationError("certificate verify failed: secret detail")
        except ssl.SSLError as exc:
            raise httpx.ConnectError("secret detail") from exc
    except httpx.ConnectError as exc:
        return exc


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (_raise(httpx.ConnectError("[Errno 111] secret detail")), "fetching the image URL failed: could not connect"),
        (_raise(_tls_error()), "fetching the image URL failed: TLS handshake or certificate verification failed"),
        (_raise(httpx.RemoteProtocolError("secret detail")), "fetching the image URL failed: invalid HTTP response"),
        (_raise(httpx.PoolTimeout("secret detail")), "fetching the image URL failed: request failed"),
        (lambda r: httpx.Response(200, stream=_BrokenStream()), "fetching the image URL failed: connection error"),
        (lambda r: httpx.Response(302), "the image URL answered HTTP 302 without a Location"),
        (lambda r: httpx.Response(302, headers={"Location": "ftp://x.example/a"}), "unsupported scheme 'ftp'"),
        (lambda r: httpx.Response(301, headers={"Location": "http://[bad/"}), "redirect has an invalid host name"),
        (lambda r: httpx.Response(301, headers={"Location": "http://x.example:bad/"}), "invalid HTTP response"),
        (lambda r: httpx.Response(500), "fetching the image URL failed with HTTP 500"),
        (
            lambda r: httpx.Response(200, content=zlib.compress(PNG), headers={"Content-Encoding": "deflate"}),
            "Content-Encoding 'deflate'",
        ),
    ],
    ids=[
        "connect",
        "tls",
        "protocol",
        "other",
        "read",
        "no-location",
        "ftp-redirect",
        "bad-host-redirect",
        "bad-redirect",
        "500",
        "deflate",
    ],
)
async def test_fetch_failures(handler: Callable[[httpx.Request], httpx.Response], message: str) -> None:
    net = FakeNet({"public.example": [PUBLIC_IP], "x.example": [PUBLIC_IP]}, handler)
    with pytest.raises(InvalidInput) as info:
        await net.fetch("http://public.example/a.png")
    assert message in info.value.message and info.value.field == FIELD
    assert "secret" not in info.value.message


class _Endless(httpx.AsyncByteStream):
    """An endless body (an iterator object, not an async generator)."""

    def __init__(self) -> None:
        self.chunks = 0

    def __aiter__(self) -> _Endless:
        return self

    async def __anext__(self) -> bytes:
        self.chunks += 1
        return b"x" * 1024


@ABANDONED_HTTPX_GENERATORS
@pytest.mark.anyio
async def test_streamed_body_limit_without_content_length() -> None:
    body = _Endless()
    net = FakeNet({"public.example": [PUBLIC_IP]}, lambda r: httpx.Response(200, stream=body))
    with pytest.raises(PayloadTooLarge, match="max_image_bytes"):
        await net.fetch("http://public.example/a.png", limits(max_bytes=10_000))
    assert body.chunks == 10  # stopped at the limit


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:4700::1111", True),
        ("64:ff9b::5db8:d822", True),  # NAT64 of a public address
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.0.1", False),
        ("100.64.0.1", False),  # shared (CGNAT)
        ("169.254.169.254", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:93.184.216.34", True),
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("::a00:1", False),  # IPv4-compatible (deprecated)
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    assert images.is_public_address(ipaddress.ip_address(address)) is public


# --- real TLS: the pinned connection still verifies the certificate of the URL's host name -------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=images.test",
            "-addext",
            "subjectAltName=DNS:images.test",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def https_server(certificate: tuple[Path, Path]) -> Iterator[LocalServer]:
    cert, key = certificate
    server = _Server(_Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: server.sni.append(name)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with serving(server, scheme="https") as local:
        yield local


@pytest.mark.anyio
async def test_https_pinned_with_sni(https_server: LocalServer, certificate: tuple[Path, Path]) -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    def transport() -> httpx.AsyncHTTPTransport:
        return httpx.AsyncHTTPTransport(verify=ssl.create_default_context(cafile=str(certificate[0])))

    url = https_server.url("/img.png", host="images.test")
    assert await fetch_url(url, FIELD, PRIVATE_OK, resolve=resolve, transport=transport()) == PNG
    assert https_server.server.sni == ["images.test"]
    # The certificate is checked against the URL's host name, not the address connected to.
    with pytest.raises(InvalidInput) as info:
        await fetch_url(
            https_server.url("/img.png", host="other.test"), FIELD, PRIVATE_OK, resolve=resolve, transport=transport()
        )
    assert info.value.message == "fetching the image URL failed: TLS handshake or certificate verification failed"
