"""The job runner: a task in the server's root task group that takes queued jobs from the store,
runs each through the inference core (`InferenceService.infer`, at the job's priority), and
records its outcome.

- Transient failures (the worker crashed, the model failed to load, memory or the queue was short,
  the store was briefly unreachable) put the job back in the queue after a capped exponential
  backoff, until `job_max_attempts` runs were started; any other error fails it at once.
- A job cancelled while it runs has its request withdrawn from its queue or batch (the worker
  stops it between steps), as when a REST client goes away; its outcome is never stored.
- At start, jobs left `running` by a server that stopped (or was killed) run again; the store
  keeps at most one result per job, whichever run finishes first being the one stored.
- A stopping server drains (`drain`): it claims nothing more, so queued jobs stay queued for
  another server or the next start, and lets running jobs finish; the jobs still running when the
  runner is cancelled are put back in the queue at once (their runs are cut, as if the server had
  died, without waiting for their leases to expire).
- Every `job_sweep_interval_s`, jobs past `job_ttl_s` are expired or deleted with their results.
- With `redis_url` (servers sharing a PostgreSQL store), queued jobs reach the servers through
  Redis Streams (`streams`); the store is still polled, less often, so that a job whose news was
  lost (Redis down or restarted) still runs, and everything runs from the store while Redis is away.
- Jobs belong to the identity that submitted them: another identity is told they do not exist,
  unless it has the admin scope.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import anyio
import anyio.abc
import structlog

from ..config import Settings
from ..errors import ModelMoraError, StorageUnavailable
from ..observability import TraceContext
from ..security import ANONYMOUS, Identity, Scope
from ..service import InferCall, InferenceService, InferResult, Priority
from ..tasks import TaskType
from .callbacks import CallbackSender, check_callback_url
from .feed import JobFeed
from .record import JobError, JobRecord, JobRequest
from .store import JobStore

if TYPE_CHECKING:
    from .streams import RedisDispatch

__all__ = ("JobRunner", "backoff_s", "sees", "stored")

T = TypeVar("T")

log = structlog.get_logger("modelmora.jobs")

TRANSIENT_HTTP = frozenset({429, 503})
"""Errors (by HTTP status) worth another attempt: queue full, worker crashed, load failed, model
unavailable, memory short, storage unavailable."""
IDLE_POLL_S = 1.0
"""The longest the runner sleeps before looking at the store again (retries fall due meanwhile)."""
STORE_RETRY_S = 1.0
CALLBACK_BATCH = 16
"""Callbacks delivered at once."""
CALLBACK_RETRY_MAX_S = 300.0
DISPATCH_POLL_S = 0.1
"""With Redis: how often an idle runner looks at the job streams."""
RELEASE_TIMEOUT_S = 5.0
"""How long a cancelled runner tries to put its interrupted jobs back in the queue (they run again
anyway once their leases expire, or at the next start)."""

Encode = Callable[[InferResult, JobRequest], bytes]
"""Turns a finished job's result into the bytes stored as its result record."""


def sees(identity: Identity, rec: JobRecord) -> bool:
    """Whether `identity` may see the job: its owner, or an admin (every caller while
    authentication is off)."""
    return rec.owner == identity.name or identity.may(Scope.ADMIN)


def backoff_s(attempts: int, base_s: float, cap_s: float) -> float:
    """The wait before run `attempts + 1`: `base_s` doubled per run so far, at most `cap_s`."""
    return float(min(cap_s, base_s * 2 ** max(attempts - 1, 0)))


class JobRunner:
    """Submits, runs, cancels and sweeps async jobs over a job store and the inference core."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        service: InferenceService,
        encode: Encode,
        dispatch: RedisDispatch | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.service = service
        self.encode = encode
        self.concurrency = settings.job_concurrency
        self._running: dict[str, anyio.CancelScope] = {}
        self._interrupted: list[str] = []
        self._draining = False
        self._idle_now = anyio.Event()
        self._idle_now.set()
        self._wake = anyio.Event()
        self._callback_wake = anyio.Event()
        self.sender = CallbackSender(settings)
        self.metrics = service.metrics
        self.feed = JobFeed(settings, store, service, self._wake_up, dispatch)
        """Where jobs come from: the store, and the job streams (`redis_url`: made from the
        settings when the runner starts, unless a dispatch is given)."""

    def call(self, model_id: str, request: JobRequest, protocol: str, trace: TraceContext | None = None) -> InferCall:
        """The inference call a job makes."""
        return InferCall(
            model_id,
            request.input_data,
            request.parameters,
            version=request.version,
            priority=Priority.parse(request.priority),
            timeout_s=request.timeout_seconds,
            return_mode=request.return_,  # type: ignore[arg-type]
            protocol=protocol,
            trace=trace,
        )

    async def submit(
        self,
        model_id: str,
        request: JobRequest,
        *,
        protocol: str,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        trace: TraceContext | None = None,
        identity: Identity = ANONYMOUS,
    ) -> tuple[JobRecord, bool]:
        """Validate the call as the sync call would, then store the job as `identity`'s (committed
        before this returns; then announced on its model's stream); returns the job and whether it
        is new (False: an `idempotency_key` named it).

        Raises:
            ModelMoraError: the call is refused (unknown model, invalid input...), or
                IdempotencyConflict, or StorageUnavailable.
        """
        if callback_url is not None:
            await check_callback_url(callback_url, self.settings)
        await self.service.check(self.call(model_id, request, protocol, trace))
        rec, created = await stored(
            self.store.create(
                model_id,
                request,
                ttl_s=self.settings.job_ttl_s,
                idempotency_key=idempotency_key,
                callback_url=callback_url,
                owner=identity.name,
            )
        )
        if created:
            self.metrics.jobs.labels(model_id, "submitted").inc()
            await self.feed.publish(rec)
            self._wake.set()
        return rec, created

    async def find(self, job_id: str, identity: Identity = ANONYMOUS) -> JobRecord | None:
        """The job, None when unknown or not `identity`'s to see (the same answer: ids never leak).

        Raises:
            StorageUnavailable: the store cannot be read now.
        """
        rec = await stored(self.store.get(job_id))
        return rec if rec is not None and sees(identity, rec) else None

    async def cancel(self, job_id: str, identity: Identity = ANONYMOUS) -> JobRecord | None:
        """Cancel a queued or running job (a running one's request is withdrawn); returns the job as
        it now is, None when unknown (or not `identity`'s)."""
        if await self.find(job_id, identity) is None:
            return None
        rec = await stored(self.store.cancel(job_id, time.time(), self.settings.job_ttl_s))
        scope = self._running.get(job_id)
        if scope is not None and rec is not None and rec.status == "cancelled":
            scope.cancel()
        return rec

    def _wake_up(self) -> None:
        self._wake.set()

    def owner_filter(self, identity: Identity) -> str | None:
        """The owner a listing is limited to: None (every job) for an admin."""
        return None if identity.may(Scope.ADMIN) else identity.name

    def statistics(self) -> dict[str, int]:
        return {"running": len(self._running), "concurrency": self.concurrency}

    def drain(self) -> None:
        """Claim no more jobs (the server is stopping); the running ones go on."""
        self._draining = True
        self._wake.set()

    async def wait_idle(self) -> None:
        """Return when no job runs here."""
        await self._idle_now.wait()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Re-queue what a previous run left running, then run jobs until cancelled."""
        if not self.store.shared:  # ours alone: what we left running runs again now
            requeued = await self.store.requeue_running()
            if requeued:
                log.info("jobs_requeued", count=requeued)
                self.metrics.jobs.labels("", "requeued").inc(requeued)
        async with contextlib.AsyncExitStack() as stack:
            if self.feed.dispatch is None and self.settings.redis_url:
                from .opening import open_dispatch

                self.feed.dispatch = await stack.enter_async_context(open_dispatch(self.settings, self.store))
            try:
                await self._loop(task_status)
            finally:
                if self._interrupted:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_TIMEOUT_S):
                        await self._release()

    async def _loop(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._sweeper)
            tg.start_soon(self._callbacks)
            tg.start_soon(self._leases)
            task_status.started()
            while True:
                free = 0 if self._draining else self.concurrency - len(self._running)
                claimed: list[JobRecord] = []
                if free > 0:
                    try:
                        claimed = await self.feed.claim(free, self._running)
                    except Exception as exc:
                        log.error("jobs_claim_failed", exc_info=exc)
                        await anyio.sleep(STORE_RETRY_S)
                        continue
                    for job in claimed:
                        scope = anyio.CancelScope()
                        self._running[job.id] = scope
                        if self._idle_now.is_set():
                            self._idle_now = anyio.Event()
                        tg.start_soon(self._run_job, job, scope)
                    if len(claimed) == free:
                        continue
                await self._idle(free > 0)

    async def _idle(self, room: bool) -> None:
        """Sleep until a job is submitted or ends, or a retry falls due (at most `IDLE_POLL_S`);
        reading the job streams, at most `DISPATCH_POLL_S`."""
        delay = DISPATCH_POLL_S if self.feed.streaming else IDLE_POLL_S
        if room and not self.feed.streaming:
            try:
                due = await self.store.next_due()
            except Exception:
                due = None
            if due is not None:
                delay = min(delay, max(due - time.time(), 0.0))
        with anyio.move_on_after(delay):
            await self._wake.wait()
        self._wake = anyio.Event()

    async def _release(self) -> None:
        """Put the jobs whose runs were cut by the runner's cancellation back in the queue."""
        ids, self._interrupted = self._interrupted, []
        try:
            await self.store.renew(ids, time.time() - 1)  # their leases end now
            requeued = await self.store.requeue_expired(time.time())
        except Exception as exc:
            log.warning("jobs_release_failed", count=len(ids), exc_info=exc)
            return
        log.info("jobs_released", count=len(ids), requeued=requeued)
        self.metrics.jobs.labels("", "requeued").inc(requeued)

    async def _run_job(self, job: JobRecord, scope: anyio.CancelScope) -> None:
        settled = False
        ended = False
        try:
            with scope:
                settled = await self._attempt(job)
            ended = True  # or cancelled by its client (`cancel`)
            settled = settled or scope.cancelled_caught  # cancelled by `cancel`: the store says so
        finally:
            if not ended:
                self._interrupted.append(job.id)
            self._running.pop(job.id, None)
            if not self._running:
                self._idle_now.set()
            self._wake.set()
            self._callback_wake.set()
        await self.feed.ended(job.id, settled=settled)  # its entry acknowledged once the outcome is stored

    async def _attempt(self, job: JobRecord) -> bool:
        """Run the job once and store its outcome; False when the outcome could not be stored."""
        ttl_s = self.settings.job_ttl_s
        try:
            result = await self._infer(job)
            body = self.encode(result, job.request)
        except ModelMoraError as exc:
            error = JobError(exc.code, exc.message, exc.field)
            if exc.http_status in TRANSIENT_HTTP and job.attempts < self.settings.job_max_attempts:
                wait_s = backoff_s(job.attempts, self.settings.job_retry_base_s, self.settings.job_retry_max_s)
                log.info("job_retry", job=job.id, attempts=job.attempts, code=exc.code, wait_s=wait_s)
                self.metrics.jobs.labels(job.model_id, "retried").inc()
                return await self._write(lambda: self.store.retry(job.id, error, time.time() + wait_s))
            log.info("job_failed", job=job.id, attempts=job.attempts, code=exc.code)
            self.metrics.jobs.labels(job.model_id, "failed").inc()
            return await self._write(lambda: self.store.fail(job.id, error, time.time(), ttl_s))
        except Exception as exc:
            log.error("job_error", job=job.id, exc_info=exc)
            error = JobError("internal_error", f"internal error running job {job.id}")
            self.metrics.jobs.labels(job.model_id, "failed").inc()
            return await self._write(lambda: self.store.fail(job.id, error, time.time(), ttl_s))
        stored_ok = await self._write(lambda: self.store.complete(job.id, body, time.time(), ttl_s))
        self.metrics.jobs.labels(job.model_id, "completed").inc()
        return stored_ok

    async def _infer(self, job: JobRecord) -> InferResult:
        """Run the job's call; a task that reports steps (txt2img) runs as a stream, its progress
        recorded at each step."""
        call = self.call(job.model_id, job.request, "job")
        rec = await self.service.catalog.get(job.model_id)
        if rec.task != TaskType.TXT2IMG:
            return await self.service.infer(call)
        stream = await self.service.open_stream(dataclasses.replace(call, stream=True))
        try:
            async for item in stream:
                if isinstance(item, InferResult):
                    return item
                steps = item.data.get("steps")
                if item.kind == "progress" and isinstance(steps, int) and steps > 0:
                    fraction = min(float(item.data.get("step", 0)) / steps, 1.0)
                    with contextlib.suppress(Exception):  # progress is best effort
                        await self.store.progress(job.id, fraction)
        finally:
            await stream.aclose()  # cancelled: the request leaves its queue, or its batch stops
        raise AssertionError("the stream ended without a result")  # pragma: no cover

    async def _write(self, write: Callable[[], Awaitable[object]]) -> bool:
        """Record an outcome, retrying while the store is unreachable (a job whose outcome could not
        be written stays running in the store and runs again at the next start, or once its lease
        expired); False when it could not be written."""
        for attempt in range(1, 6):
            try:
                await write()
                return True
            except Exception as exc:
                log.warning("job_store_write_failed", attempt=attempt, exc_info=exc)
                await anyio.sleep(STORE_RETRY_S * attempt)
        log.error("job_outcome_lost_until_restart")
        return False

    async def _callbacks(self) -> None:
        """Deliver the callbacks that are due, concurrently; sleep until a job ends (or a second)."""
        while True:
            try:
                due = await self.store.due_callbacks(time.time(), CALLBACK_BATCH)
            except Exception as exc:
                log.error("callbacks_query_failed", exc_info=exc)
                due = []
            async with anyio.create_task_group() as tg:
                for job in due:
                    tg.start_soon(self._callback, job)
            if len(due) < CALLBACK_BATCH:
                with anyio.move_on_after(IDLE_POLL_S):
                    await self._callback_wake.wait()
                self._callback_wake = anyio.Event()

    async def _callback(self, job: JobRecord) -> None:
        delivered = await self.sender.deliver(job)
        attempts = job.callback_attempts + 1
        retry_at = None
        if not delivered and attempts < self.settings.callback_max_attempts:
            retry_at = time.time() + backoff_s(attempts, self.settings.callback_retry_base_s, CALLBACK_RETRY_MAX_S)
        elif not delivered:
            log.warning("callback_given_up", job=job.id, attempts=attempts)
        outcome = "delivered" if delivered else ("retried" if retry_at is not None else "failed")
        self.metrics.job_callbacks.labels(outcome).inc()
        await self._write(lambda: self.store.callback_attempted(job.id, delivered=delivered, retry_at=retry_at))

    async def _leases(self) -> None:
        """Renew the leases of the jobs running here (and their stream entries) every third of
        `job_lease_s`, and re-queue running jobs whose lease expired (their server died)."""
        lease_s = self.settings.job_lease_s
        while True:
            await anyio.sleep(lease_s / 3)
            await self.feed.renew()
            try:
                if self._running:
                    await self.store.renew(list(self._running), time.time() + lease_s)
                requeued = await self.store.requeue_expired(time.time())
                if requeued:
                    log.info("jobs_lease_expired", count=requeued)
                    self.metrics.jobs.labels("", "requeued").inc(requeued)
                    self._wake.set()
            except Exception as exc:
                log.error("jobs_lease_failed", exc_info=exc)

    async def _sweeper(self) -> None:
        while True:
            try:
                expired, deleted = await self.store.sweep(time.time(), self.settings.job_ttl_s)
                if expired or deleted:
                    log.info("jobs_swept", expired=expired, deleted=deleted)
            except Exception as exc:
                log.error("jobs_sweep_failed", exc_info=exc)
            await anyio.sleep(self.settings.job_sweep_interval_s)


async def stored(call: Awaitable[T]) -> T:
    """Await a store call from a front end: a store error becomes `StorageUnavailable` (logged).

    Raises:
        StorageUnavailable: the store cannot be read or written now.
    """
    try:
        return await call
    except ModelMoraError:
        raise
    except Exception as exc:
        log.error("job_store_failed", exc_info=exc)
        raise StorageUnavailable("the job store cannot be read or written now") from None
