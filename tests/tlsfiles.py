"""TLS files made at test time (trustme): a CA, a server certificate and key for 127.0.0.1 and
localhost written where `[tls]` reads them (replaced atomically by `rotate`), client certificates, and
the client contexts that trust (or not) the CA."""

from __future__ import annotations

import itertools
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import trustme

_SERIAL = itertools.count(1)


@dataclass
class TlsFiles:
    """`cert_file`, `key_file` (the server's) and `ca_file` (the CA that signed it and the clients)."""

    root: Path
    ca: trustme.CA = field(default_factory=trustme.CA)
    cert_name: str = ""

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.rotate()

    @property
    def cert_file(self) -> Path:
        return self.root / "server.crt"

    @property
    def key_file(self) -> Path:
        return self.root / "server.key"

    @property
    def ca_file(self) -> Path:
        return self.root / "ca.crt"

    def rotate(self) -> str:
        """A new server certificate (its common name is returned) in place of the files, each replaced
        by an atomic rename."""
        self.cert_name = f"server-{next(_SERIAL)}"
        cert = self.ca.issue_cert("127.0.0.1", "localhost", common_name=self.cert_name)
        for path, data in (
            (self.key_file, cert.private_key_pem.bytes()),
            (self.cert_file, b"".join(blob.bytes() for blob in cert.cert_chain_pems)),
        ):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return self.cert_name

    def settings(self, *, mutual: bool = False) -> dict[str, str]:
        """The `[tls]` section for these files (`mutual`: clients need a certificate from the CA)."""
        tls = {"cert_file": str(self.cert_file), "key_file": str(self.key_file)}
        return {**tls, "client_ca_file": str(self.ca_file)} if mutual else tls

    def env(self, *, mutual: bool = False) -> dict[str, str]:
        return {f"MODELMORA_TLS__{k.upper()}": v for k, v in self.settings(mutual=mutual).items()}

    def client_cert(self, name: str = "client@example") -> tuple[Path, Path]:
        """A client certificate and key signed by the CA (files)."""
        cert = self.ca.issue_cert(name)
        cert_path, key_path = self.root / f"{name}.crt", self.root / f"{name}.key"
        cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key_path))
        return cert_path, key_path

    def client_context(
        self, *, alpn: tuple[str, ...] = ("h2", "http/1.1"), client_cert: bool = False, trust: bool = True
    ) -> ssl.SSLContext:
        """A client context trusting the CA (or, `trust=False`, only the system's CAs)."""
        ctx = ssl.create_default_context()
        if trust:
            self.ca.configure_trust(ctx)
        ctx.set_alpn_protocols(list(alpn))
        if client_cert:
            ctx.load_cert_chain(*self.client_cert())
        return ctx


def peer_common_name(port: int, ctx: ssl.SSLContext) -> tuple[str, str | None]:
    """The common name of the certificate a fresh TLS connection to 127.0.0.1:`port` is shown, and the
    ALPN protocol chosen."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        subject = dict(item[0] for item in tls.getpeercert()["subject"])
        return subject["commonName"], tls.selected_alpn_protocol()


async def until(check: Callable[[], bool], timeout_s: float = 30) -> None:
    """Return once `check()` holds (a safety net, never a performance bound)."""
    with anyio.fail_after(timeout_s):
        while True:
            if check():
                return
            await anyio.sleep(0.01)
