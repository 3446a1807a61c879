"""A warning for an address other machines can reach, served in cleartext."""

from __future__ import annotations

from ..config import Settings

__all__ = ("LOOPBACK_HOSTS", "check_exposure")

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def check_exposure(settings: Settings, *, tls: bool, auth: bool) -> str | None:
    """A warning for an address other clients can reach served in cleartext (None: nothing to say)."""
    if tls or settings.host in LOOPBACK_HOSTS or settings.host.startswith("127."):
        return None
    if not auth:
        return (
            "insecure_bind: cleartext and no authentication on a non-loopback address: anyone who can reach it "
            "may infer, load, unload and change settings; set [auth] tokens_file and [tls] cert_file/key_file"
        )
    return "cleartext_tokens: tokens travel in cleartext on a non-loopback address; set [tls] cert_file and key_file"
