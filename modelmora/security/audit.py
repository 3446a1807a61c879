"""The audit trail: one `audit` event (logger `modelmora.audit`) per admin action, naming the
token's name (never the token), the action, its target and its outcome."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from ..errors import ModelMoraError
from .identity import Identity

__all__ = ("audit", "audited")

log = structlog.get_logger("modelmora.audit")


def audit(action: str, identity: Identity, outcome: str = "ok", **target: Any) -> None:
    """Log one audit event (`outcome`: "ok" or the error's code)."""
    emit = log.info if outcome == "ok" else log.warning
    emit("audit", action=action, by=identity.name, outcome=outcome, **target)


@contextmanager
def audited(action: str, identity: Identity, **target: Any) -> Iterator[None]:
    """Log the action's audit event when it ends: ok, the code of the `ModelMoraError` it raised,
    "cancelled" or "internal_error". Exceptions pass through unchanged."""
    outcome = "ok"
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, ModelMoraError):
            outcome = exc.code
        else:  # a bug (its text stays in the error log), or cancellation (a BaseException)
            outcome = "internal_error" if isinstance(exc, Exception) else "cancelled"
        raise
    finally:
        audit(action, identity, outcome, **target)
