"""TLS contexts for both listeners, from the standard library's `ssl`: TLS 1.2 at least, no
compression, the TLS 1.2 cipher suites HTTP/2 allows (forward secrecy, AEAD), ALPN `h2` + `http/1.1`
for REST and `h2` for gRPC, and client certificates required when `client_ca_file` is set (mutual TLS;
only those CAs are trusted for clients, not the system's).

Rotation without dropping connections: the listeners keep the context they were started with (the
"front" one), whose SNI callback, called in every handshake (with or without a server name), moves the
new connection onto the newest context. `reload()` builds new contexts from the files; connections
already open keep theirs."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import structlog

from ..config import TlsSettings

__all__ = ("GRPC_ALPN", "HTTP_ALPN", "TLS_CIPHERS", "ServerTls", "TlsError", "server_context")

log = structlog.get_logger("modelmora.security")

HTTP_ALPN = ("h2", "http/1.1")
GRPC_ALPN = ("h2",)
TLS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
"""TLS 1.2 suites (TLS 1.3 has its own, all allowed): those RFC 9113 section 9.2.2 lets HTTP/2 use."""


class TlsError(Exception):
    """A certificate, key or CA file cannot be loaded (the message names the file and why)."""


def _reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def server_context(settings: TlsSettings, alpn: tuple[str, ...]) -> ssl.SSLContext:
    """A server context from the `[tls]` files.

    Raises:
        TlsError: a file is missing or unreadable, not PEM, or the key does not match the certificate.
    """
    if not settings.cert_file or not settings.key_file:
        raise TlsError("[tls] needs both cert_file and key_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.set_ciphers(TLS_CIPHERS)
    ctx.set_alpn_protocols(list(alpn))
    cert, key = Path(settings.cert_file).expanduser(), Path(settings.key_file).expanduser()
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ValueError) as exc:
        raise TlsError(f"cannot load the TLS certificate {cert} with the key {key}: {_reason(exc)}") from None
    if settings.client_ca_file:
        cafile = Path(settings.client_ca_file).expanduser()
        try:
            ctx.load_verify_locations(cafile=cafile)
        except (OSError, ValueError) as exc:
            raise TlsError(f"cannot load the client CA file {cafile}: {_reason(exc)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class ServerTls:
    """The REST and gRPC contexts, reloadable (`security.reload.follow_files`).

    Raises:
        TlsError: at construction, the files cannot be loaded.
    """

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self.http = server_context(settings, HTTP_ALPN)
        """The context the HTTP listener wraps its connections with (kept for the server's life)."""
        self.grpc = server_context(settings, GRPC_ALPN)
        """The context the gRPC listener serves with."""
        self._current = {id(self.http): self.http, id(self.grpc): self.grpc}
        self.http.sni_callback = self._newest
        self.grpc.sni_callback = self._newest
        self.reloads = 0
        self.failed_reloads = 0
        self.mutual = bool(settings.client_ca_file)

    def watched_paths(self) -> list[Path]:
        files = (self.settings.cert_file, self.settings.key_file, self.settings.client_ca_file)
        return [Path(f).expanduser() for f in files if f]

    def _newest(self, sslobj: Any, server_name: str | None, front: ssl.SSLContext) -> None:
        newest = self._current[id(front)]
        if newest is not front:
            sslobj.context = newest

    def reload(self) -> bool:
        """Load the files again; new connections get the new contexts. A failure keeps the current
        ones (logged); returns whether they were replaced."""
        try:
            http, grpc = server_context(self.settings, HTTP_ALPN), server_context(self.settings, GRPC_ALPN)
        except TlsError as exc:
            self.failed_reloads += 1
            log.error("tls_not_reloaded", reason=str(exc))
            return False
        self._current = {id(self.http): http, id(self.grpc): grpc}
        self.reloads += 1
        log.info("tls_reloaded", cert_file=self.settings.cert_file, reloads=self.reloads)
        return True
