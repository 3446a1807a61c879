"""The job store interface: every backend (SQLite today) keeps jobs and their results behind it.

Its promises, which the runner and the front ends rely on:
- `create` commits the job before it returns (its id is then safe to hand out);
- a job has at most one result record, written in the same transaction that completes it, and
  only while the job is `running` (a cancelled or expired job never gets one);
- every state change is conditional on the state it leaves, so two writers never both win.
"""

from __future__ import annotations

import builtins
from typing import Protocol

from ..errors import IdempotencyConflict
from .record import JobError, JobPage, JobRecord, JobRequest, JobStatus

__all__ = ("JobStore", "idempotent")


def idempotent(
    old: JobRecord, key: str, model_id: str, request: JobRequest, callback_url: str | None, owner: str | None
) -> JobRecord:
    """The job an `Idempotency-Key` already names, when the new submit repeats it.

    Raises:
        IdempotencyConflict: another request, or another owner's key (its job is not named: ids
            never leak between identities).
    """
    if old.owner != owner:
        raise IdempotencyConflict(f"the Idempotency-Key {key!r} is already in use: choose another")
    if old.model_id != model_id or old.request != request or old.callback_url != callback_url:
        raise IdempotencyConflict(f"the Idempotency-Key {key!r} already names job {old.id} with another request")
    return old


class JobStore(Protocol):
    """Durable async jobs. Methods are async and safe on asyncio and trio."""

    async def create(
        self,
        model_id: str,
        request: JobRequest,
        *,
        ttl_s: float,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        owner: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Store a new queued job of `owner` (the submitting identity); returns it and True. With an
        `idempotency_key` the same owner already used for the same model and request, returns that
        job and False.

        Raises:
            IdempotencyConflict: the key was used for another request.
        """
        ...

    async def get(self, job_id: str) -> JobRecord | None: ...

    async def list(
        self,
        *,
        model_id: str | None = None,
        status: JobStatus | None = None,
        limit: int = 100,
        offset: int = 0,
        owner: str | None = None,
    ) -> JobPage:
        """Jobs, newest first (of `owner` alone, when given)."""
        ...

    shared: bool
    """True where several servers may share the store (then a server's start re-queues nothing:
    expired leases do); False where one server owns it (`requeue_running` at start)."""

    async def claim(
        self,
        now: float,
        limit: int,
        lease_s: float = 60.0,
        *,
        prefer: frozenset[str] | None = None,
        cold_after_s: float = 0.0,
    ) -> builtins.list[JobRecord]:
        """Move up to `limit` queued jobs that are due (`not_before <= now`) to running, counting an
        attempt each, leased for `lease_s`; highest priority first, then oldest. With `prefer` (the
        models this server holds loaded), a job of another model is taken only once it was
        submitted `cold_after_s` ago."""
        ...

    async def claim_job(self, job_id: str, now: float, lease_s: float) -> JobRecord | None:
        """Move one job to running (an attempt counted, leased for `lease_s`) if it is queued and due,
        or running on a lease that expired before `now` (its server died); None otherwise (running
        elsewhere, finished, waiting for a retry, unknown)."""
        ...

    async def renew(self, job_ids: builtins.list[str], until: float) -> None:
        """Extend the leases of running jobs (their server is alive)."""
        ...

    async def requeue_expired(self, now: float) -> int:
        """Running jobs whose lease expired before `now` (their server died) go back to the queue."""
        ...

    async def next_due(self) -> float | None:
        """The earliest `not_before` of the queued jobs (None: none is queued)."""
        ...

    async def complete(self, job_id: str, result: bytes, now: float, ttl_s: float) -> bool:
        """Store the result and mark the job completed, in one transaction; False (and nothing
        written) unless the job is running."""
        ...

    async def retry(self, job_id: str, error: JobError, not_before: float) -> bool:
        """A running job goes back to the queue until `not_before` (its error kept)."""
        ...

    async def fail(self, job_id: str, error: JobError, now: float, ttl_s: float) -> bool:
        """A running job failed for good."""
        ...

    async def progress(self, job_id: str, fraction: float) -> None:
        """Record a running job's progress (0..1)."""
        ...

    async def cancel(self, job_id: str, now: float, ttl_s: float) -> JobRecord | None:
        """Cancel a queued or running job; returns the job as it now is (a finished one unchanged),
        None when unknown."""
        ...

    async def requeue_running(self) -> int:
        """At start: jobs left running by a server that stopped go back to the queue (they run again)."""
        ...

    async def result(self, job_id: str) -> bytes | None: ...

    async def sweep(self, now: float, ttl_s: float) -> tuple[int, int]:
        """Queued jobs past their expiry become `expired` (kept `ttl_s` more); finished jobs past it
        are deleted with their results. Returns (expired, deleted)."""
        ...

    async def due_callbacks(self, now: float, limit: int) -> builtins.list[JobRecord]:
        """Finished jobs whose callback is due (pending, `callback_next <= now`)."""
        ...

    async def callback_attempted(self, job_id: str, *, delivered: bool, retry_at: float | None) -> None:
        """Record a callback attempt: delivered; else due again at `retry_at`, or failed for good (None)."""
        ...

    def close(self) -> None: ...
