"""The gate every call passes at the edge, once per protocol, before its body is read: who is it
(a bearer token), may it (the scope its endpoint or method needs), and is it within its token's
limits. What passes is an `Identity` (and a `Permit` to give back when the call ends).

Authentication is on when `[auth] tokens_file` is set or `[auth] tokens` holds a token; while it is
off every caller is `ANONYMOUS` (all scopes) and nothing is limited.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import structlog

from ..config import AuthSettings
from ..errors import PermissionDenied, Unauthenticated
from .identity import ANONYMOUS, OPEN, TOKEN, Access, Identity, Scope
from .limits import TokenLimits
from .tokens import TokenError, TokenTable, parse_tokens

__all__ = ("REALM", "Gate", "Permit", "bearer_token")

log = structlog.get_logger("modelmora.security")

REALM = "modelmora"
_CHALLENGE = f'Bearer realm="{REALM}"'


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (None: absent or another scheme)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


class Permit:
    """An admitted call: its identity, and its place among its token's running requests until
    `release()` (idempotent)."""

    __slots__ = ("_limits", "identity")

    def __init__(self, identity: Identity, limits: TokenLimits | None) -> None:
        self.identity = identity
        self._limits = limits

    def charge(self) -> None:
        """Count one more request of this call against its token's rate (each message of a stream).

        Raises:
            RateLimited: over the rate.
        """
        if self._limits is not None:
            self._limits.charge(self.identity.name)

    def release(self) -> None:
        limits, self._limits = self._limits, None
        if limits is not None:
            limits.release(self.identity.name)


_FREE = Permit(ANONYMOUS, None)
"""The permit of every call while authentication is off (nothing to give back)."""
_PUBLIC = Permit(Identity(ANONYMOUS.name, frozenset()), None)
"""The permit of a call to an open endpoint while authentication is on: no scope at all."""


class Gate:
    """Authentication, scopes and per-token limits for every front end.

    Args:
        settings: the `[auth]` section.
        clock: the monotonic clock of the rate limits.

    Raises:
        TokenError: at construction, a malformed token entry or an unreadable tokens file.
    """

    def __init__(self, settings: AuthSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.enabled = settings.enabled
        self._inline = parse_tokens(settings.tokens, "[auth] tokens")
        self.table = TokenTable(self._inline)
        if settings.tokens_file:
            self.table = self._read_table()
        limits = TokenLimits(
            settings.rate_limit_per_s, settings.rate_limit_burst, settings.max_concurrent_requests, clock
        )
        self.limits = limits if limits.active else None
        self.refused = 0

    @property
    def tokens_file(self) -> Path | None:
        return Path(self.settings.tokens_file).expanduser() if self.settings.tokens_file else None

    def watched_paths(self) -> list[Path]:
        """The tokens file, when there is one (followed by `security.reload.follow_files`)."""
        return [self.tokens_file] if self.tokens_file is not None else []

    def _read_table(self) -> TokenTable:
        path = self.tokens_file
        assert path is not None
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise TokenError(f"cannot read the tokens file {path}: {reason}") from None
        entries = parse_tokens(text.splitlines(), str(path))
        clash = {i.name for i, _ in entries} & {i.name for i, _ in self._inline}
        if clash:
            raise TokenError(f"{path}: the name {sorted(clash)[0]!r} is also in [auth] tokens")
        return TokenTable([*self._inline, *entries])

    def reload(self) -> bool:
        """Re-read the tokens file (blocking: call it from a thread). A file that cannot be read or
        parsed leaves the tokens as they were (logged); returns whether the table was replaced."""
        if self.tokens_file is None:
            return False
        try:
            table = self._read_table()
        except TokenError as exc:
            log.error("tokens_not_reloaded", reason=str(exc), kept=len(self.table))
            return False
        self.table = table
        log.info("tokens_reloaded", file=str(self.tokens_file), names=table.names)
        return True

    def admit(self, access: Access, authorization: str | None) -> Permit:
        """Admit one call that needs `access`, given its `Authorization` value.

        Raises:
            Unauthenticated: no bearer token, or an unknown one.
            PermissionDenied: the token lacks the scope.
            RateLimited, ConcurrencyLimited: over the token's limits.
        """
        if not self.enabled:
            return _FREE
        if access == OPEN:
            return _PUBLIC
        token = bearer_token(authorization)
        if token is None:
            self.refused += 1
            raise Unauthenticated(
                "this endpoint needs a token: send 'Authorization: Bearer <token>'", challenge=_CHALLENGE
            )
        identity = self.table.find(token)
        if identity is None:
            self.refused += 1
            raise Unauthenticated("the token is not valid", challenge=f'{_CHALLENGE}, error="invalid_token"')
        if access != TOKEN and not identity.may(Scope(access)):
            self.refused += 1
            log.warning("permission_denied", by=identity.name, needs=str(access))
            raise PermissionDenied(
                f"the token {identity.name!r} lacks the {str(access)!r} scope",
                challenge=f'{_CHALLENGE}, error="insufficient_scope", scope="{access}"',
            )
        if self.limits is None:
            return Permit(identity, None)
        self.limits.acquire(identity.name)
        return Permit(identity, self.limits)
