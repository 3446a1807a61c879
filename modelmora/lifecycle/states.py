"""Model version states, as reported by the status endpoint, and the transitions allowed
between them (`check_transition` refuses any other)."""

from __future__ import annotations

import enum

__all__ = ("TRANSITIONS", "IllegalTransition", "ModelState", "check_transition")


class ModelState(enum.StrEnum):
    REGISTERED = "registered"
    DOWNLOADING = "downloading"
    CACHED = "cached"
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


_S = ModelState
TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    _S.REGISTERED: frozenset({_S.DOWNLOADING, _S.CACHED, _S.FAILED}),
    _S.DOWNLOADING: frozenset({_S.CACHED, _S.FAILED}),
    # a load starts; a load that failed before the worker came up
    _S.CACHED: frozenset({_S.LOADING, _S.FAILED}),
    # weights loaded (test inference next); ready without a test phase; failed; stopped while loading
    _S.LOADING: frozenset({_S.WARMING, _S.READY, _S.FAILED, _S.CACHED, _S.UNLOADING}),
    _S.WARMING: frozenset({_S.READY, _S.FAILED, _S.CACHED, _S.UNLOADING}),
    # stopping (unload, eviction, idle, replaced); the worker crashed
    _S.READY: frozenset({_S.UNLOADING, _S.CACHED}),
    _S.UNLOADING: frozenset({_S.CACHED}),
    # an explicit load clears the failure; a background retry starts loading
    _S.FAILED: frozenset({_S.CACHED, _S.LOADING}),
}
"""State -> the states it may move to."""


class IllegalTransition(RuntimeError):
    """A state change the lifecycle does not allow: a bug in the supervisor."""


def check_transition(old: ModelState, new: ModelState) -> None:
    """Raise `IllegalTransition` unless `old` may move to `new` (staying put is always allowed)."""
    if new != old and new not in TRANSITIONS[old]:
        raise IllegalTransition(f"a model version cannot go from {old} to {new}")
