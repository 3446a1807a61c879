"""What the client shows the server: a bearer token and TLS settings, from arguments or the
environment (`MODELMORA_TOKEN`, `MODELMORA_CA_FILE`, `MODELMORA_CLIENT_CERT`, `MODELMORA_CLIENT_KEY`).

The token travels as `authorization: Bearer ...` metadata on every call and is never part of the
client's `repr`, its `metadata` attribute or a log line.
"""

from __future__ import annotations

import os
import ssl as _ssl

__all__ = ("auth_metadata", "tls_context")


def auth_metadata(token: str | None) -> dict[str, str]:
    """The call metadata for `token` (None: `MODELMORA_TOKEN`; empty: no token)."""
    token = os.environ.get("MODELMORA_TOKEN") if token is None else token
    if not token:
        return {}
    if any(c.isspace() for c in token):
        raise ValueError("the token must not contain whitespace")
    return {"authorization": f"Bearer {token}"}


def tls_context(
    ssl: bool | _ssl.SSLContext,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> _ssl.SSLContext | None:
    """The TLS context for the channel, or None for cleartext.

    `ssl` may be a ready context (used as it is). Otherwise TLS is on when `ssl` is True or any
    file is given (arguments, else `MODELMORA_CA_FILE` / `MODELMORA_CLIENT_CERT` /
    `MODELMORA_CLIENT_KEY`): the server is verified against `ca_file` (else the system's CAs), and
    `cert_file` + `key_file` are shown for mutual TLS. ALPN offers h2, as gRPC requires.
    """
    if isinstance(ssl, _ssl.SSLContext):
        return ssl
    ca_file = ca_file or os.environ.get("MODELMORA_CA_FILE") or None
    cert_file = cert_file or os.environ.get("MODELMORA_CLIENT_CERT") or None
    key_file = key_file or os.environ.get("MODELMORA_CLIENT_KEY") or None
    if not (ssl or ca_file or cert_file):
        return None
    if key_file and not cert_file:
        raise ValueError("a client key needs its certificate (cert_file / MODELMORA_CLIENT_CERT)")
    context = _ssl.create_default_context(cafile=ca_file)
    context.minimum_version = _ssl.TLSVersion.TLSv1_2
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    context.set_alpn_protocols(["h2"])
    return context
