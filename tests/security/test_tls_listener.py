"""HTTPS on the HTTP listener, in process on both backends, with certificates made by trustme: HTTP/2
chosen by ALPN (and HTTP/1.1 for clients that only speak it), a client that does not trust the CA is
refused, mutual TLS with and without a client certificate, and rotation: new connections get the new
certificate while an open connection keeps serving. Also the TLS settings' errors in one line."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypercorn.config import Config

from modelmora.config import load_settings
from modelmora.httpserver import HttpListener
from modelmora.security import ServerTls, TlsError, check_exposure, follow_files
from modelmora.server import bind_socket

from tlsfiles import TlsFiles, peer_common_name, until

pytestmark = pytest.mark.anyio


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = f"{scope['scheme']} {scope['http_version']}".encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]}
    )
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def https(tls: ServerTls) -> AsyncIterator[int]:
    sock = bind_socket("127.0.0.1", 0)
    config = Config()
    config.graceful_timeout = 1
    config.ssl_handshake_timeout = 10
    listener = HttpListener(hello, config, sock, limit=100, ssl=tls.http)
    stop = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, stop.wait)
            yield sock.getsockname()[1]
            stop.set()
    finally:
        sock.close()


@pytest.fixture
def files(tmp_path: Path) -> TlsFiles:
    return TlsFiles(tmp_path / "tls")


def server_tls(files: TlsFiles, *, mutual: bool = False) -> ServerTls:
    return ServerTls(load_settings(None, environ={}, tls=files.settings(mutual=mutual)).tls)


async def test_https_negotiates_http2_by_alpn_and_http11_for_older_clients(files: TlsFiles) -> None:
    async with https(server_tls(files)) as port:
        url = f"https://127.0.0.1:{port}/"
        async with httpx.AsyncClient(http2=True, verify=files.client_context()) as client:
            r = await client.get(url)
            ssl_object = r.extensions["network_stream"].get_extra_info("ssl_object")
            assert ssl_object.selected_alpn_protocol() == "h2"
            assert (r.http_version, r.text) == ("HTTP/2", "https 2")
            assert ssl_object.version() in ("TLSv1.2", "TLSv1.3")
        async with httpx.AsyncClient(verify=files.client_context(alpn=("http/1.1",))) as client:
            r = await client.get(url)
            assert (r.http_version, r.text) == ("HTTP/1.1", "https 1.1")
        assert (await anyio.to_thread.run_sync(peer_common_name, port, files.client_context()))[1] == "h2"


async def test_a_client_that_does_not_trust_the_ca_is_refused(files: TlsFiles) -> None:
    async with https(server_tls(files)) as port:
        async with httpx.AsyncClient(verify=files.client_context(trust=False)) as client:
            with pytest.raises(httpx.ConnectError) as err:
                await client.get(f"https://127.0.0.1:{port}/")
            assert "CERTIFICATE_VERIFY_FAILED" in _causes(err.value)
        async with httpx.AsyncClient() as plain:  # cleartext HTTP to the TLS port gets no answer
            with pytest.raises(httpx.TransportError):
                await plain.get(f"http://127.0.0.1:{port}/")


def test_contexts_refuse_tls_below_1_2_and_compression(files: TlsFiles) -> None:
    tls = server_tls(files, mutual=True)
    for ctx in (tls.http, tls.grpc):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.options & ssl.OP_NO_COMPRESSION
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert not ctx.get_ca_certs() or all("trustme" in str(c.get("issuer")) for c in ctx.get_ca_certs())
    assert server_tls(files).http.verify_mode == ssl.CERT_NONE


async def test_mutual_tls_needs_a_client_certificate_from_the_ca(files: TlsFiles, tmp_path: Path) -> None:
    other = TlsFiles(tmp_path / "other")  # another CA's client certificate
    async with https(server_tls(files, mutual=True)) as port:
        url = f"https://127.0.0.1:{port}/"
        async with httpx.AsyncClient(http2=True, verify=files.client_context(client_cert=True)) as client:
            assert (await client.get(url)).text == "https 2"
        for ctx in (files.client_context(), _trusting(files, other.client_cert())):
            async with httpx.AsyncClient(verify=ctx) as client:
                with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                    await client.get(url)


def _causes(exc: BaseException | None) -> str:
    """The messages of an exception and its causes (trio wraps the SSL error)."""
    text = []
    while exc is not None:
        text.append(repr(exc))
        exc = exc.__cause__ or exc.__context__
    return " ".join(text)


def _trusting(files: TlsFiles, cert_and_key: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = files.client_context()
    ctx.load_cert_chain(*cert_and_key)
    return ctx


async def test_rotated_files_serve_new_connections_and_open_ones_go_on(files: TlsFiles) -> None:
    tls = server_tls(files)
    first = files.cert_name
    async with https(tls) as port, anyio.create_task_group() as tg:
        await tg.start(lambda task_status: follow_files([tls], poll_s=0.02, task_status=task_status))
        url = f"https://127.0.0.1:{port}/"
        async with httpx.AsyncClient(http2=True, verify=files.client_context()) as kept:
            assert (await kept.get(url)).status_code == 200
            assert (await anyio.to_thread.run_sync(peer_common_name, port, files.client_context()))[0] == first
            second = files.rotate()
            await until(lambda: tls.reloads >= 1)  # the next poll reloads
            assert (await anyio.to_thread.run_sync(peer_common_name, port, files.client_context()))[0] == second
            r = await kept.get(url)  # the connection opened before the rotation still serves
            assert r.status_code == 200 and r.extensions["network_stream"].get_extra_info("ssl_object")
            files.key_file.write_text("not a key")  # a broken rotation keeps the certificate in force
            await until(lambda: tls.failed_reloads >= 1)
            assert (await anyio.to_thread.run_sync(peer_common_name, port, files.client_context()))[0] == second
        tg.cancel_scope.cancel()


def test_tls_settings_errors_name_the_file(files: TlsFiles, tmp_path: Path) -> None:
    with pytest.raises(TlsError, match=r"^\[tls\] needs both cert_file and key_file$"):
        ServerTls(load_settings(None, environ={}, tls={"cert_file": str(files.cert_file)}).tls)
    missing = {**files.settings(), "key_file": str(tmp_path / "nope.key")}
    with pytest.raises(TlsError) as err:
        ServerTls(load_settings(None, environ={}, tls=missing).tls)
    key = tmp_path / "nope.key"
    assert (
        str(err.value)
        == f"cannot load the TLS certificate {files.cert_file} with the key {key}: No such file or directory"
    )
    other = TlsFiles(tmp_path / "other")
    mismatch = {**files.settings(), "key_file": str(other.key_file)}
    with pytest.raises(TlsError, match="KEY_VALUES_MISMATCH"):
        ServerTls(load_settings(None, environ={}, tls=mismatch).tls)
    bad_ca = {**files.settings(), "client_ca_file": str(files.key_file)}
    with pytest.raises(TlsError, match=f"^cannot load the client CA file {files.key_file}: "):
        ServerTls(load_settings(None, environ={}, tls=bad_ca).tls)


@pytest.mark.parametrize(
    ("host", "tls", "auth", "event"),
    [
        ("127.0.0.1", False, False, None),
        ("::1", False, False, None),
        ("127.0.0.2", False, False, None),
        ("0.0.0.0", True, False, None),
        ("0.0.0.0", False, False, "insecure_bind"),
        ("192.168.1.4", False, True, "cleartext_tokens"),
        ("::", True, True, None),
    ],
)
def test_a_public_address_in_cleartext_is_warned_about(host: str, tls: bool, auth: bool, event: str | None) -> None:
    warning = check_exposure(load_settings(None, environ={}, host=host), tls=tls, auth=auth)
    assert (warning.partition(":")[0] if warning else None) == event
