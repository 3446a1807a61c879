"""The image's HEALTHCHECK: GET /health/live on this container's server; exit 0 when it answers 200.

The address comes from the server's own configuration (file, then MODELMORA_* environment), so a
changed `port` or `[tls]` is followed: HTTPS when TLS is on (the certificate is not verified: the
check asks its own server over loopback). A wildcard `host` is asked at the loopback address.
Exit 1, with one line on stderr, when the server does not answer 200 in time.
"""

from __future__ import annotations

import ssl
import sys
import urllib.request

LIVE_PATH = "/health/live"
TIMEOUT_S = 5.0


def live_url() -> tuple[str, ssl.SSLContext | None]:
    """The liveness URL of the server configured here, and the TLS context to ask it with."""
    from modelmora.config import load_settings

    settings = load_settings()
    host = settings.host
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    if settings.tls.enabled:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return f"https://{host}:{settings.port}{LIVE_PATH}", context
    return f"http://{host}:{settings.port}{LIVE_PATH}", None


def main() -> int:
    try:
        url, context = live_url()
    except Exception as exc:  # a configuration the server itself would refuse
        sys.stderr.write(f"unhealthy: {exc}\n")
        return 1
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as response:
            status = response.status
    except OSError as exc:  # refused, timed out, or an HTTP error status (HTTPError is an OSError)
        sys.stderr.write(f"unhealthy: {url}: {exc}\n")
        return 1
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
