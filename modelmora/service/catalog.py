"""Registry lookups on the request path, with a short cache."""

from __future__ import annotations

import time

from ..errors import ModelNotFound
from ..registry import ModelRecord, ModelStore

__all__ = ("Catalog",)

CATALOG_TTL_S = 1.0


class Catalog:
    """Registry lookups with a short cache, so a model installed while we run is found at once.

    An expired entry is refreshed by one caller while the others keep using it (one registry
    read per model per TTL, however many requests arrive meanwhile).
    """

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self._cache: dict[str, tuple[float, ModelRecord]] = {}
        self._refreshing: set[str] = set()

    async def get(self, model_id: str) -> ModelRecord:
        """The model's registry record.

        Raises:
            ModelNotFound: it is not installed.
        """
        hit = self._cache.get(model_id)
        now = time.monotonic()
        if hit is not None and (now - hit[0] < CATALOG_TTL_S or model_id in self._refreshing):
            return hit[1]
        self._refreshing.add(model_id)
        try:
            rec = await self.store.aget(model_id)
        finally:
            self._refreshing.discard(model_id)
        if rec is None:
            self._cache.pop(model_id, None)
            raise ModelNotFound(f"model {model_id!r} is not installed")
        self._cache[model_id] = (now, rec)
        return rec

    def forget(self, model_id: str) -> None:
        self._cache.pop(model_id, None)

    def forget_all(self) -> None:
        self._cache.clear()
