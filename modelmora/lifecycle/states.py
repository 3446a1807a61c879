"""Model version states, as reported by the status endpoint."""

from __future__ import annotations

import enum

__all__ = ("ModelState",)


class ModelState(enum.StrEnum):
    REGISTERED = "registered"
    DOWNLOADING = "downloading"
    CACHED = "cached"
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"
