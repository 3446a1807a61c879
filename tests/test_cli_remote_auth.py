"""`mm` remote mode sends MODELMORA_TOKEN as a bearer token (a real HTTP server in a thread records
what arrives); without it the server's 401 is one line, and the token is never printed."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from modelmora.cli_base import CommandFailed
from modelmora.cli_remote import Remote

TOKEN = "remote-read-token-0123456789"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.headers.get("Authorization") == f"Bearer {TOKEN}"
        body = (
            {"models": []}
            if ok
            else {"error": {"code": "unauthenticated", "message": "send a bearer token", "field": None}}
        )
        data = json.dumps(body).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_remote_calls_carry_the_token_from_the_environment(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELMORA_TOKEN", raising=False)
    with pytest.raises(CommandFailed, match=r"send a bearer token \[HTTP 401 unauthenticated\]"):
        Remote(url).call("GET", "/api/v1/status")
    monkeypatch.setenv("MODELMORA_TOKEN", TOKEN)
    remote = Remote(url)
    assert remote.call("GET", "/api/v1/status") == {"models": []}
    assert TOKEN not in repr(remote)


def test_unreadable_tls_files_are_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("MODELMORA_CA_FILE", "/nonexistent/ca.pem")
    with pytest.raises(CommandFailed, match="MODELMORA_CA_FILE"):
        Remote("https://127.0.0.1:1")
