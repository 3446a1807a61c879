"""Tokens: parsed from `NAME SCOPE[,SCOPE...] TOKEN` lines (the tokens file and `[auth] tokens`), kept
only as SHA-256 digests, and looked up in constant time.

A line's token may be written `sha256:<64 hex digits>` (its digest) so that the file need not hold it
in clear. Errors name the source and the line, never the token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .identity import Identity, Scope

__all__ = ("MIN_TOKEN_CHARS", "TokenError", "TokenTable", "parse_tokens")

MIN_TOKEN_CHARS = 16
"""Shorter tokens are refused (`python -c 'import secrets; print(secrets.token_urlsafe(32))'` makes one)."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}$")
_TOKEN = re.compile(r"^[\x21-\x7e]+$")
"""Visible ASCII: what an `Authorization` header or gRPC metadata value carries."""
_COMMENT = re.compile(r"(^|\s)#.*$")
"""A comment: `#` at the start of a line or after a blank (a token may hold `#`)."""
_DIGEST = re.compile(r"^sha256:(?P<hex>[0-9a-fA-F]{64})$")


class TokenError(Exception):
    """A tokens file or `[auth] tokens` entry is malformed (the message never holds a token)."""


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    identity: Identity


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii", "replace")).digest()


def parse_tokens(lines: Iterable[str], source: str) -> list[tuple[Identity, bytes]]:
    """Each entry's identity and token digest.

    Raises:
        TokenError: a malformed line, an unknown scope, a short token, a name or token given twice.
    """
    entries: list[tuple[Identity, bytes]] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for number, raw in enumerate(lines, 1):
        line = _COMMENT.sub("", raw).strip()
        if not line:
            continue
        where = f"{source}, line {number}"
        fields = line.split()
        if len(fields) != 3:
            raise TokenError(f"{where}: expected 'NAME SCOPE[,SCOPE...] TOKEN' (3 fields, found {len(fields)})")
        name, scopes_text, token = fields
        if not _NAME.match(name):
            raise TokenError(f"{where}: the name {name!r} is not a name (letters, digits, . _ @ : -; 64 at most)")
        scopes: set[Scope] = set()
        for word in scopes_text.split(","):
            try:
                scopes.add(Scope(word.strip().lower()))
            except ValueError:
                raise TokenError(
                    f"{where}: unknown scope {word!r} (expected a comma-separated list of infer, read, admin)"
                ) from None
        if (m := _DIGEST.match(token)) is not None:
            digest = bytes.fromhex(m["hex"])
        elif not _TOKEN.match(token):
            raise TokenError(f"{where}: the token of {name!r} holds characters other than visible ASCII")
        elif len(token) < MIN_TOKEN_CHARS:
            raise TokenError(f"{where}: the token of {name!r} is shorter than {MIN_TOKEN_CHARS} characters")
        else:
            digest = _digest(token)
        if name in names:
            raise TokenError(f"{where}: the name {name!r} is given twice")
        if digest in digests:
            raise TokenError(f"{where}: the token of {name!r} is also another name's token")
        names.add(name)
        digests.add(digest)
        entries.append((Identity(name, frozenset(scopes)), digest))
    return entries


class TokenTable:
    """Known tokens, as digests. `find` compares the presented token's digest with every entry's in
    constant time (`hmac.compare_digest`), so the time taken does not tell which entry matched."""

    def __init__(self, entries: Iterable[tuple[Identity, bytes]] = ()) -> None:
        self._entries = tuple(_Entry(digest, identity) for identity, digest in entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> list[str]:
        return [e.identity.name for e in self._entries]

    def find(self, token: str) -> Identity | None:
        """The identity the token belongs to, or None."""
        digest = _digest(token)
        found = None
        for entry in self._entries:  # no early exit
            if hmac.compare_digest(entry.digest, digest):
                found = entry.identity
        return found
