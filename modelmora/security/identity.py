"""Who is calling: the identity the edge hands to the core (never a header or a token)."""

from __future__ import annotations

import enum
from typing import Literal

import msgspec

__all__ = ("ANONYMOUS", "OPEN", "TOKEN", "Access", "Identity", "Scope")


class Scope(enum.StrEnum):
    """What a token may do. Scopes are independent: list each one a token needs."""

    INFER = "infer"
    """Inference (and reading one's own results)."""
    READ = "read"
    """The registry, the runtime status, per-model health, metrics."""
    ADMIN = "admin"
    """Load, unload, settings, install, delete."""


OPEN: Literal["open"] = "open"
"""Access rule: no token needed (health probes, the docs)."""
TOKEN: Literal["token"] = "token"
"""Access rule: any known token (a path the table does not name: the answer is then 404 or 405)."""

Access = Scope | Literal["open", "token"]
"""What an endpoint or method needs: a scope, any token, or nothing."""


class Identity(msgspec.Struct, frozen=True, gc=False):
    """The caller as the core sees it: the token's name (safe to log) and its scopes."""

    name: str
    scopes: frozenset[Scope]

    def may(self, scope: Scope) -> bool:
        return scope in self.scopes


ANONYMOUS = Identity("anonymous", frozenset(Scope))
"""Every caller while authentication is off: all scopes."""
