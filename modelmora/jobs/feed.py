"""Where the runner finds its next jobs: the store, and with `redis_url` the job streams
(`streams`).

Without Redis the store is polled (the runner wakes at once for a job submitted here). With Redis
up, the streams name the jobs (each claimed in the store before it runs, so the store decides) and
the store is polled every `FALLBACK_POLL_S` only, for retries falling due and for jobs whose news
was lost; with Redis away, the store alone, as without it, and Redis is tried again every
`REDIS_RETRY_S`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container
from typing import TYPE_CHECKING

import structlog

from ..config import Settings
from ..observability.metrics import Metrics
from ..service import InferenceService
from .record import JobRecord
from .store import JobStore

if TYPE_CHECKING:
    from .streams import Entry, RedisDispatch

__all__ = ("FALLBACK_POLL_S", "REDIS_RETRY_S", "JobFeed")

log = structlog.get_logger("modelmora.jobs")

FALLBACK_POLL_S = 2.0
"""With Redis up: how often the store itself is polled (retries falling due, jobs whose news was lost)."""
REDIS_RETRY_S = 1.0
"""With Redis away: how often it is tried again (the store is polled meanwhile)."""


class JobFeed:
    """The runner's source of jobs (see the module's docstring); `wake` wakes the runner."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        service: InferenceService,
        wake: Callable[[], None],
        dispatch: RedisDispatch | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.service = service
        self.metrics: Metrics = service.metrics
        self.wake = wake
        self.dispatch = dispatch
        self.redis_up = True
        self.entries: dict[str, Entry] = {}
        """The stream entries of the jobs running here, by job id (acknowledged when they end)."""
        self._redis_retry_at = 0.0
        self._store_poll_at = 0.0

    @property
    def streaming(self) -> bool:
        """Whether jobs come through the streams now (Redis configured and up)."""
        return self.dispatch is not None and self.redis_up

    async def claim(self, free: int, running: Container[str]) -> list[JobRecord]:
        """Claim up to `free` jobs (`running`: the jobs running here): from the job streams while
        Redis is up, and from the store (every call without Redis, else every `FALLBACK_POLL_S`)."""
        claimed = await self._take(free, running) if await self._redis_ready() else []
        now = time.monotonic()
        if len(claimed) < free and (not self.streaming or now >= self._store_poll_at):
            self._store_poll_at = now + FALLBACK_POLL_S
            claimed += await self._claim_stored(free - len(claimed))
        return claimed

    async def _claim_stored(self, free: int) -> list[JobRecord]:
        """Claim up to `free` queued jobs from the store; a server sharing its store prefers the
        models it holds loaded (`job_warm_wait_s`), so that a cluster does not cold-load a model
        on every server."""
        wait_s = self.settings.job_warm_wait_s
        if not self.store.shared or wait_s <= 0:
            return await self.store.claim(time.time(), free, self.settings.job_lease_s)
        warm = self.service.warm_models()
        return await self.store.claim(time.time(), free, self.settings.job_lease_s, prefer=warm, cold_after_s=wait_s)

    def _redis_down(self, exc: BaseException) -> None:
        if self.redis_up:
            log.warning("redis_unavailable", error=str(exc) or type(exc).__name__)
        self.redis_up = False
        self._redis_retry_at = time.monotonic() + REDIS_RETRY_S
        self.wake()

    async def _redis_ready(self) -> bool:
        """Whether the job streams can be read now (while Redis is away, tried every `REDIS_RETRY_S`)."""
        if self.dispatch is None:
            return False
        if not self.redis_up and time.monotonic() >= self._redis_retry_at:
            try:
                await self.dispatch.ping()
            except Exception as exc:
                self._redis_down(exc)
                return False
            log.info("redis_available")
            self.redis_up = True
        return self.redis_up

    async def publish(self, rec: JobRecord) -> None:
        """Announce a committed job on its model's stream (Redis away: the store's polling finds it)."""
        if self.streaming:
            assert self.dispatch is not None
            try:
                await self.dispatch.publish(rec.model_id, rec.id)
            except Exception as exc:
                self._redis_down(exc)

    async def _take(self, free: int, running: Container[str]) -> list[JobRecord]:
        """Up to `free` jobs named by the job streams, each claimed in the store; an entry whose job
        is not to run here is acknowledged at once.

        Raises:
            Exception: the store's (the entries taken stay pending: claimed again later).
        """
        assert self.dispatch is not None
        wait_s = self.settings.job_warm_wait_s
        warm = self.service.warm_models() if wait_s > 0 else None
        try:
            entries = await self.dispatch.take(free, warm, wait_s)
        except Exception as exc:
            self._redis_down(exc)
            return []
        out, done = [], []
        for entry in entries:
            if entry.job_id in running:  # claimed again here: it runs here already
                if self.entries.get(entry.job_id) != entry:
                    done.append(entry)
                continue
            rec = await self.store.claim_job(entry.job_id, time.time(), self.settings.job_lease_s)
            if rec is None:  # finished, cancelled, running elsewhere or waiting for a retry
                done.append(entry)
                continue
            if rec.attempts > 1:
                self.metrics.jobs.labels(rec.model_id, "reclaimed").inc()
            self.entries[rec.id] = entry
            out.append(rec)
        await self._ack(done)
        return out

    async def _ack(self, entries: list[Entry]) -> None:
        if entries and self.dispatch is not None:
            try:
                await self.dispatch.ack(entries)
            except Exception as exc:  # left pending: claimed again later, then acknowledged
                self._redis_down(exc)

    async def ended(self, job_id: str, *, settled: bool) -> None:
        """A job stopped running here; `settled`: its outcome is stored (its entry is acknowledged),
        else its entry stays pending (another server claims it once idle `job_lease_s`)."""
        entry = self.entries.pop(job_id, None)
        if settled and entry is not None:
            await self._ack([entry])

    async def renew(self) -> None:
        """Renew the stream entries of the jobs running here (no other server claims them)."""
        if self.entries and self.streaming:
            assert self.dispatch is not None
            try:
                await self.dispatch.touch(list(self.entries.values()))
            except Exception as exc:
                self._redis_down(exc)
