"""A local HTTP file server for source tests (ETag, Range with If-Range, conditional GET, a
response cut short on demand, every request recorded), and archive builders."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

__all__ = ("Files", "files", "model_files", "targz")


class Files:
    """A file server over a dict of bytes: ETag, Range (with If-Range), conditional GET; `cut[path] = n`
    closes the next response to `path` after n bytes (every response while `path` is in `cut_always`)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.cut_always: set[str] = set()
        self.requests: list[tuple[str, dict[str, str]]] = []
        files = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                files.requests.append((self.path, headers))
                body = files.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
                if headers.get("if-none-match") == etag:
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.end_headers()
                    return
                start = 0
                rng = headers.get("range", "")
                if rng.startswith("bytes=") and headers.get("if-range", etag) == etag:
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                self.send_response(206 if start else 200)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(body) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                cut = files.cut.get(self.path) if self.path in files.cut_always else files.cut.pop(self.path, None)
                self.wfile.write(body[start:] if cut is None else body[start : start + cut])
                if cut is not None:
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def gets(self, path: str) -> list[dict[str, str]]:
        return [h for p, h in self.requests if p == path]


@pytest.fixture
def files() -> Iterator[Files]:
    f = Files()
    yield f
    f.server.shutdown()
    f.server.server_close()


def targz(members: dict[str, bytes], *, links: dict[str, str] | None = None, top: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{top}{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(f"{top}{name}")
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def model_files(st_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(st_dir).as_posix(): p.read_bytes() for p in sorted(st_dir.rglob("*")) if p.is_file()}
