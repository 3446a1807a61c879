"""The protocol-neutral inference core: every front end (REST today; gRPC, async jobs,
OpenAI and Open Inference Protocol next) calls it, and nothing else below it.

Given a model id, an optional version, typed task inputs and parameters, a priority, a
deadline and a cancellation (the caller's cancel scope, or a "client went away" awaitable),
it validates, prepares, queues, waits and returns a typed result, or an async iterator of
events for streaming. It raises only `ModelMoraError` subclasses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import structlog

from ..clock import event_loop_clock
from ..config import Settings
from ..errors import ClientGone, InvalidInput, ModelNotFound, ModelUnavailable
from ..images import ImageLimits, PixelBudget
from ..observability import TraceContext, new_trace, reset_current, set_current
from ..registry import ModelRecord, ModelStore
from ..results import ResultStore
from ..scheduler import Request, Scheduler
from ..tasks import TaskType
from .admin import ModelAdmin
from .call import InferCall, Job
from .catalog import Catalog
from .models import ModelControl
from .outputs import InferResult, Timing
from .record import RequestRecorder
from .status import (
    HealthModel,
    HealthModels,
    ServerStatus,
    registered_status,
    shared_memory_status,
    supervisor_status,
)
from .stream import InferStream
from .tasks import ADAPTERS

__all__ = ("InferenceService",)

log = structlog.get_logger("modelmora.service")

REGISTRY_SYNC_S = 2.0
"""How often the registry is compared with the running models (installs, changes and
uninstalls made by `mm` in another process reach the server within this time)."""


class InferenceService(ModelControl):
    """The core over a registry store, a running scheduler and a result store.

    `run()` keeps the running models in step with the registry (start it in the server's
    task group); everything else is called by the front ends. The model operations (list,
    settings, delete, load, unload, preload) come from `ModelControl` (`models.py`).
    """

    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        scheduler: Scheduler,
        results: ResultStore | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.scheduler = scheduler
        self.results = results
        self.limits = ImageLimits.from_settings(settings)
        self.pixels = PixelBudget.from_settings(settings)
        """Decoded pixels of all requests in flight (held from decoding until the answer)."""
        self.catalog = Catalog(store)
        self.admin = ModelAdmin(settings, store, scheduler, self.catalog)
        """Registry changes while the server runs: metadata, the active version, deleting."""
        self.started = time.time()
        self.sync_errors = 0
        self._now: Callable[[], float] | None = None
        """The event loop's clock, looked up at the first request."""
        self.metrics = scheduler.metrics
        self.record = RequestRecorder(self.metrics, settings.slow_request_fraction)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Compare the registry with the running models every `REGISTRY_SYNC_S` (errors are logged),
        and run the background operations (`admin.operations`)."""
        async with anyio.create_task_group() as tg:
            await tg.start(self.admin.operations.run)
            task_status.started()
            while True:
                await anyio.sleep(REGISTRY_SYNC_S)
                await self.sync_registry()

    async def sync_registry(self) -> None:
        """Replace workers whose registry entry changed; stop those of uninstalled models.

        A failed round is logged and counted (`sync_errors`); the next one runs as usual."""
        try:
            records = await self.store.alist()
            self.catalog.forget_all()
            self.scheduler.sync(records)
        except Exception as exc:
            self.sync_errors += 1
            log.error("registry_sync_failed", errors=self.sync_errors, exc_info=exc)

    # -- inference --------------------------------------------------------------------------

    async def _start(
        self,
        call: InferCall,
        rec: ModelRecord | None = None,
        t0: float | None = None,
        trace: TraceContext | None = None,
    ) -> Job:
        """Validate and prepare `call` (its record looked up when not given) into a job ready to submit."""
        t0 = time.perf_counter() if t0 is None else t0
        now = self._now
        if now is None:
            now = self._now = event_loop_clock()
        start = now()
        rec = rec or await self.catalog.get(call.model_id)
        trace = trace or call.trace or new_trace()
        version = call.version or rec.active_version
        if rec.version_record(version) is None:
            raise ModelNotFound(f"model {call.model_id!r} has no version {version!r}", field="$.version")
        try:
            adapter = ADAPTERS[TaskType(rec.task)]
        except ValueError:
            raise ModelUnavailable(f"task type {rec.task!r} of model {call.model_id!r} is not served") from None
        timeout_s = call.timeout_s or getattr(self.settings.timeout_s, rec.task) or adapter.info.timeout_s
        prepared = await adapter.prepare(
            call.inputs,
            call.parameters if call.parameters is not None else {},
            stream=call.stream,
            return_mode=call.return_mode,
            settings=self.settings,
            limits=self.limits,
            results=self.results,
            pixels=self.pixels,
            deadline=start + timeout_s,
        )
        try:
            rt = self.scheduler.runtime_for(rec, version)
        except BaseException:
            prepared.release()
            raise
        req = Request(
            rt.key, prepared.inputs, prepared.params, call.priority, start + timeout_s, trace_id=trace.trace_id
        )
        return Job(call, rec, version, adapter, prepared, rt, req, timeout_s, t0, trace)

    async def _result(self, job: Job) -> InferResult:
        req = job.request
        if req.error is not None:
            raise req.error
        output = await job.adapter.output(req.result, job.prepared, self.results)
        timing = Timing(
            round((req.dispatched_at - req.enqueued_at) * 1e3, 3),
            round((req.finished_at - req.dispatched_at) * 1e3, 3),
            round((time.perf_counter() - job.t0) * 1e3, 3),
        )
        return InferResult(job.record.id, job.version, job.adapter.info.type, output, timing)

    def warm_models(self) -> frozenset[str]:
        """The models with a version loaded, or loading, here."""
        return frozenset(key.model_id for key, rt in self.scheduler.models.items() if rt.in_use)

    async def check(self, call: InferCall) -> None:
        """Validate `call` as `infer` would before queuing it (model, version, inputs, parameters),
        and queue nothing: async jobs refuse bad input at submit.

        Raises:
            ModelMoraError: what `infer` would raise before queuing the request.
        """
        job = await self._start(call)
        job.prepared.release()

    async def infer(self, call: InferCall, *, gone: Callable[[], Awaitable[Any]] | None = None) -> InferResult:
        """Run one request to its result.

        Args:
            call: the request.
            gone: returns when the caller went away (REST: the client disconnected); the
                request then leaves the queue (or its batch), and `ClientGone` is raised.

        The caller's own cancellation withdraws the request the same way. Its metrics (under
        `call.protocol`) and log line are recorded here, whatever its outcome; lines logged while it
        is served carry its trace id.

        Raises:
            ModelMoraError: every expected failure, each with its status.
        """
        t0 = time.perf_counter()
        trace = call.trace or new_trace()
        token = set_current(trace)
        rec: ModelRecord | None = None
        try:
            if call.stream:
                raise InvalidInput("a streaming request is served by open_stream", field="$.stream")
            rec = await self.catalog.get(call.model_id)
            job = await self._start(call, rec, t0, trace)
            try:
                result = await self._run(job, gone)
            finally:
                job.prepared.release()
            seconds = time.perf_counter() - t0
            self.record.ok(
                job.runtime.metrics, call.protocol, job.version, result.timing, seconds, job.timeout_s, trace
            )
            return result
        except BaseException as exc:
            self._failed(call, rec, exc, t0, trace)
            raise
        finally:
            reset_current(token)

    async def _run(self, job: Job, gone: Callable[[], Awaitable[Any]] | None) -> InferResult:
        req, rt = job.request, job.runtime
        self.scheduler.submit(rt, req)
        client_gone = False
        try:
            with anyio.CancelScope(deadline=req.deadline) as waiting:
                req.on_done = waiting.cancel
                if gone is None:
                    await anyio.sleep_forever()
                else:
                    await gone()
                    client_gone = True
        finally:
            req.on_done = None
            if not req.done.is_set():
                self.scheduler.withdraw(rt, req)  # deadline, disconnect, cancellation: it leaves at once
        if not req.done.is_set():
            if client_gone:
                raise ClientGone(f"the client of this request to model {job.record.id!r} went away")
            raise self.scheduler.unfinished_error(rt, job.timeout_s)
        return await self._result(job)

    def _failed(
        self, call: InferCall, rec: ModelRecord | None, exc: BaseException, t0: float, trace: TraceContext
    ) -> None:
        model, task = (rec.id, rec.task) if rec is not None else ("", "")
        self.record.failed(model, task, call.protocol, exc, time.perf_counter() - t0, trace)

    async def open_stream(self, call: InferCall) -> InferStream:
        """Queue a streaming request; iterate the returned stream for its events, then its result.

        Errors before anything runs (validation, queue full, failed model) are raised here.
        """
        t0 = time.perf_counter()
        trace = call.trace or new_trace()
        token = set_current(trace)
        rec: ModelRecord | None = None
        try:
            rec = await self.catalog.get(call.model_id)
            job = await self._start(call, rec, t0, trace)
        except BaseException as exc:
            self._failed(call, rec, exc, t0, trace)
            raise
        finally:
            reset_current(token)
        send, receive = anyio.create_memory_object_stream[tuple[int, str, dict[str, Any]]](math.inf)
        job.request.on_event = lambda item, kind, data: send.send_nowait((item, kind, data))
        job.request.on_done = send.close  # the events end when the request is done
        try:
            self.scheduler.submit(job.runtime, job.request)
        except BaseException as exc:
            send.close()
            receive.close()
            job.prepared.release()
            self._failed(call, rec, exc, t0, trace)
            raise
        return InferStream(self, job, send, receive)

    # -- status -----------------------------------------------------------------------------

    async def status(self) -> ServerStatus:
        """The runtime of every registered model version (loaded or not), the budget, the supervisor."""
        running = self.scheduler.status()
        seen = {(s.model_id, s.version) for s in running}
        records = await self._registry(self.store.alist())
        idle = [
            registered_status(rec, v.version)
            for rec in records
            for v in rec.versions
            if (rec.id, v.version) not in seen and v.version == rec.active_version
        ]
        launcher = self.scheduler.launcher
        return ServerStatus(
            supervisor_status(self.started),
            launcher.statistics() if launcher is not None else None,
            self.scheduler.budget_status(),
            self.pixels.statistics(),
            shared_memory_status(running),
            sorted([*running, *idle], key=lambda s: (s.model_id, s.version)),
        )

    async def health(self) -> HealthModels:
        """Every registered model's health: a failed one is unhealthy, with why."""
        status = await self.status()
        return HealthModels(
            [HealthModel(s.model_id, s.version, s.state != "failed", s.state, s.last_error) for s in status.models]
        )

    async def ready(self) -> str | None:
        """None when a request would be served now without waiting for start-up; else why not."""
        try:
            await self.store.aping()
        except Exception:
            log.exception("registry_unreachable")
            return "registry unreachable"
        launcher = self.scheduler.launcher
        if getattr(launcher, "state", None) == "starting":
            return "the zygote is still importing the model libraries"
        return None
