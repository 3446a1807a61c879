"""The `Scheduler` facade: one queue and one task per model version, within a memory budget.

The service calls it; nothing above it touches a runtime's fields. `runtime_for` is the only
way to a model version's runtime; `apply_settings` the only way to change one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import structlog

from ..config import ModelSettings, Settings
from ..errors import DeadlineExceeded, InsufficientMemory, ModelMoraError, ModelNotFound, ModelUnavailable
from ..lifecycle import Launcher, ModelState, WorkerHandle, WorkerSpec
from ..observability import Metrics, ModelSample, RuntimeSample, detach
from ..registry import FileVerifier, ModelRecord, effective_settings
from ..tasks import task_info
from . import batching
from .admission import Admission, BudgetStatus
from .queues import ModelQueue
from .request import ModelKey, Priority, Request
from .runtime import ModelIdentity, ModelRuntime, StopReason
from .status import ModelStatus, model_status
from .supervision import ModelSupervisor, WorkerOpener

__all__ = ("Scheduler",)

log = structlog.get_logger("modelmora.scheduler")
_MB = 2**20


class Scheduler:
    """Queues requests per model version and runs them on that version's worker.

    Args:
        settings: the server settings.
        instance_id: names this server's shared-memory segments.
        pipelines: task type -> worker pipeline overrides (tests, custom pipelines).
        worker_env: the workers' environment (default: ours).
        clock: the queues' clock (default: the event loop's).
        launcher: how workers start (default: spawned).
        open_worker: replaces starting real workers (policy tests use fakes).
        metrics: where its figures go (default: a registry of its own, `metrics`).
        verifier: checks a version's files against their recorded SHA-256 before each worker
            starts (default: one of its own).
    """

    def __init__(
        self,
        settings: Settings,
        instance_id: str,
        *,
        pipelines: dict[str, str] | None = None,
        worker_env: dict[str, str] | None = None,
        clock: Callable[[], float] | None = None,
        launcher: Launcher | None = None,
        open_worker: WorkerOpener | None = None,
        metrics: Metrics | None = None,
        verifier: FileVerifier | None = None,
    ) -> None:
        self.settings = settings
        self.instance_id = instance_id
        self.pipelines = {**settings.pipelines, **(pipelines or {})}
        self.worker_env = worker_env
        self.clock = clock
        self.launcher = launcher
        self.verifier = verifier or FileVerifier()
        self.models: dict[ModelKey, ModelRuntime] = {}
        self.metrics = metrics or Metrics()
        self.metrics.observe_runtime(self.runtime_sample)
        self.admission = Admission(settings, self.models, self.metrics)
        self.supervisor = ModelSupervisor(
            settings, self.admission, open_worker or self._open_worker, metrics=self.metrics
        )
        self._tg: anyio.abc.TaskGroup | None = None
        self._closing = False
        self._stop = anyio.Event()

    @asynccontextmanager
    async def _open_worker(self, spec: WorkerSpec, on_phase: Callable[[str], None]) -> AsyncIterator[WorkerHandle]:
        s = self.settings
        rt = self.models.get(ModelKey(spec.model_id, spec.version))
        if rt is not None and rt.identity.path == spec.path:  # ChecksumMismatch: the load fails, naming the file
            what = f"model {spec.model_id!r} version {spec.version}"
            files = dict(rt.identity.files)
            await anyio.to_thread.run_sync(lambda: self.verifier.verify(spec.path, files, what=what))
        extra: dict[str, Any] = {} if self.launcher is None else {"launcher": self.launcher}
        async with WorkerHandle.open(
            spec,
            instance_id=self.instance_id,
            request_ring_bytes=s.request_ring_mb * _MB,
            response_ring_bytes=s.response_ring_mb * _MB,
            start_timeout_s=s.worker_start_timeout_s,
            stop_grace_s=s.worker_stop_grace_s,
            stall_s=s.worker_stall_s,
            env=self.worker_env,
            on_phase=on_phase,
            **extra,
        ) as worker:
            yield worker

    def close(self) -> None:
        """Stop accepting requests and make `run()` stop every worker and return."""
        self._stop.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the per-model tasks and the memory monitor until `close()`; then stop every worker."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            shared = getattr(self.launcher, "shared_pss_bytes", None)
            tg.start_soon(self.admission.monitor, shared if callable(shared) else None, name="memory monitor")
            task_status.started()
            try:
                await self._stop.wait()
            finally:
                self._closing = True
                for rt in self.models.values():
                    rt.queue.fail_all(ModelUnavailable("the server is shutting down"))
                tg.cancel_scope.cancel()

    # -- runtimes --------------------------------------------------------------------------

    def _identity(self, rec: ModelRecord, version: str, settings: ModelSettings) -> ModelIdentity:
        vrec = rec.version_record(version)
        if vrec is None:
            raise ModelNotFound(f"model {rec.id!r} has no version {version!r}", field="$.version")
        info = task_info(rec.task)
        pipeline = self.pipelines.get(rec.task) or (info.pipeline if info is not None else None)
        if pipeline is None:
            raise ModelUnavailable(f"task type {rec.task!r} of model {rec.id!r} is not supported")
        return ModelIdentity(
            rec.task,
            pipeline,
            vrec.path,
            tuple(sorted(vrec.files.items())),
            vrec.created_at,
            settings.device or "auto",
            settings.dtype or "auto",
        )

    def runtime_for(self, rec: ModelRecord, version: str | None = None) -> ModelRuntime:
        """The runtime of a model version as the registry describes it now (created, and its
        task started, on first use; brought up to date with the record otherwise).

        Raises:
            ModelNotFound: the model has no such version.
            ModelUnavailable: the task type is not served, or the server is stopping.
        """
        version = version or rec.active_version
        key = ModelKey(rec.id, version)
        rt = self.models.get(key)
        if rt is not None and not rt.removed:
            if rt.record is not rec:  # the catalog hands out the same record while it is unchanged
                self._update(rt, rec, version, effective_settings(rec.settings, rec.metadata))
            return rt
        settings = effective_settings(rec.settings, rec.metadata)
        if self._tg is None or self._closing:
            raise ModelUnavailable("the server is not accepting requests")
        identity = self._identity(rec, version, settings)
        vrec = rec.version_record(version)
        assert vrec is not None
        queue = ModelQueue(
            settings.queue_limit or self.settings.queue_limit, self.clock, self.settings.priority_aging_ms / 1000
        )
        rt = ModelRuntime(
            key,
            identity,
            queue,
            settings,
            vrec.size_bytes,
            record=rec,
            any_changed=self.admission.capacity,
            metrics=self.metrics.model(rec.id, rec.task),
        )
        rt.hint_mb, rt.hint_vram_mb = rec.metadata.resources.memory_mb, rec.metadata.resources.gpu_vram_mb
        self.models[key] = rt
        self._tg.start_soon(self._serve, rt, name=f"model {key}")
        return rt

    async def _serve(self, rt: ModelRuntime) -> None:
        detach()  # started by a request: its lines are the model's, not that request's
        try:
            await self.supervisor.serve(rt)
        finally:
            if self.models.get(rt.key) is rt:
                del self.models[rt.key]

    def _update(self, rt: ModelRuntime, rec: ModelRecord, version: str, settings: ModelSettings) -> None:
        was_active = rt.record is not None and rt.record.active_version == version
        rt.record = rec
        rt.hint_mb, rt.hint_vram_mb = rec.metadata.resources.memory_mb, rec.metadata.resources.gpu_vram_mb
        if was_active and rec.active_version != version:
            self.retire(rt)
        if settings != rt.model_settings:
            self.apply_settings(rt, settings)
        identity = self._identity(rec, version, settings)
        if identity != rt.identity:
            vrec = rec.version_record(version)
            rt.identity = identity
            rt.weights_bytes = vrec.size_bytes if vrec is not None else rt.weights_bytes
            rt.measured_mb = rt.measured_vram_mb = None  # other weights: estimate again
            if rt.stale:
                log.info("model_replaced", model=str(rt.key), reason="registry entry, files or device changed")
                rt.stop(StopReason.REPLACE)
            rt.poke()

    def apply_settings(self, rt: ModelRuntime, settings: ModelSettings) -> None:
        """Apply a model's new registry settings now: batching, queue and keep-alive from the next
        decision; device and dtype by replacing an idle worker (running batches finish first)."""
        rt.model_settings = settings
        rt.queue.limit = settings.queue_limit or self.settings.queue_limit
        device, dtype = settings.device or "auto", settings.dtype or "auto"
        if (device, dtype) != (rt.identity.device, rt.identity.dtype):
            rt.identity = dataclasses.replace(rt.identity, device=device, dtype=dtype)
            if rt.stale:
                rt.stop(StopReason.REPLACE)
        rt.poke()

    def sync(self, records: Iterable[ModelRecord]) -> None:
        """Bring every runtime up to date with the registry: a changed entry replaces its worker,
        an uninstalled model stops (running batches finish; queued requests fail) and its
        background retries end."""
        by_id = {rec.id: rec for rec in records}
        for rt in list(self.models.values()):
            self._sync_runtime(rt, by_id.get(rt.key.model_id))

    def sync_model(self, rec: ModelRecord | None, *, model_id: str = "") -> None:
        """`sync` for one model (`rec` None: `model_id` was uninstalled)."""
        wanted = rec.id if rec is not None else model_id
        for rt in self.runtimes_of(wanted):
            self._sync_runtime(rt, rec)

    def _sync_runtime(self, rt: ModelRuntime, rec: ModelRecord | None) -> None:
        if rec is None or rec.version_record(rt.key.version) is None:
            self.remove(rt)
            return
        try:
            self._update(rt, rec, rt.key.version, effective_settings(rec.settings, rec.metadata))
        except ModelMoraError as exc:
            log.warning("model_sync_failed", model=str(rt.key), error=exc.message)

    def runtimes_of(self, model_id: str, version: str | None = None) -> list[ModelRuntime]:
        """The runtimes of a model's versions (of one version) that exist now."""
        return [
            rt
            for key, rt in list(self.models.items())
            if key.model_id == model_id and (version is None or key.version == version) and not rt.removed
        ]

    def retire(self, rt: ModelRuntime) -> None:
        """Another version became the active one: this version's worker serves what is queued and
        running, then stops (requests that name this version explicitly start it again)."""
        if rt.loaded or rt.state in (ModelState.LOADING, ModelState.WARMING):
            log.info("model_retired", model=str(rt.key), reason="another version is active")
            rt.stop(StopReason.UNLOAD)

    def remove(self, rt: ModelRuntime) -> None:
        """The model version was uninstalled: stop its worker and its task."""
        if rt.removed:
            return
        log.info("model_removed", model=str(rt.key))
        rt.removed = True
        rt.load_requested = False
        rt.retry_at = None
        rt.queue.fail_all(ModelNotFound(f"model {rt.key.model_id!r} was uninstalled"))
        rt.stop(StopReason.UNLOAD_NOW)

    # -- requests --------------------------------------------------------------------------

    def submit(self, rt: ModelRuntime, req: Request) -> None:
        """Queue `req` on its model.

        Raises:
            QueueFull: the model's queue is at its limit.
            ModelLoadFailed: the model is failed (503 at once; a retry may be scheduled).
        """
        if self._closing:
            raise ModelUnavailable("the server is shutting down")
        if rt.state == ModelState.FAILED:
            raise self.supervisor.failed_error(rt)
        rt.queue.put_nowait(req)
        rt.last_used = rt.queue.clock()
        stopping = rt.stop_reason is not None and not rt.stop_reason.drains  # its worker is on its way out
        if (rt.state is not ModelState.READY or stopping) and rt.metrics is not None:  # it waits for a load
            req.cold = True
            rt.metrics.cold_starts.inc()

    def withdraw(self, rt: ModelRuntime, req: Request) -> None:
        """The caller gave up (deadline, disconnect): drop it from the queue, or drop its result.

        When nobody waits for any request of a running batch any more, the worker is told
        to stop it at the pipeline's next step (long generations free the worker early).
        """
        if not req.done.is_set():
            req.cancel()
            rt.queue.discard(req)
            rt.cancelled += 1
            batching.abandon_if_unwanted(rt, req)
            if rt.waiting_for_memory:
                rt.poke()  # the load waiting for room may have nobody left

    def unfinished_error(self, rt: ModelRuntime, timeout_s: float) -> ModelMoraError:
        """Why a request on `rt` did not finish within `timeout_s`."""
        if rt.waiting_for_memory:
            return InsufficientMemory(
                f"model {rt.key.model_id!r} could not be loaded within {timeout_s:g} s: the memory budget is full"
                " and no loaded model can be evicted",
                retry_after_s=5,
            )
        return DeadlineExceeded(f"model {rt.key.model_id!r} did not answer within {timeout_s:g} s")

    # -- explicit control ------------------------------------------------------------------

    def request_load(self, rt: ModelRuntime) -> None:
        """Start loading without waiting (preload)."""
        rt.load_requested = True
        rt.poke()

    async def load(self, rt: ModelRuntime, timeout_s: float) -> None:
        """Load a model version (lazy load ahead of time) and wait until it is ready.

        Resets a failed model's retry attempts.

        Raises:
            ModelLoadFailed: the load or its test inference failed.
            InsufficientMemory: no room within `timeout_s`.
        """
        if rt.loaded and rt.state == ModelState.READY:
            return
        rt.failures = 0
        rt.retry_at = None
        if rt.state == ModelState.FAILED:
            rt.set_state(ModelState.CACHED, "load requested")
        self.request_load(rt)
        with anyio.move_on_after(timeout_s):
            while True:
                if rt.loaded and rt.state == ModelState.READY:
                    return
                if rt.state == ModelState.FAILED:
                    raise self.supervisor.failed_error(rt)
                await rt.changed.wait()
        if rt.waiting_for_memory:
            rt.load_requested = False  # its caller gives up: it stops waiting unless requests do
            rt.poke()
            raise InsufficientMemory(self.admission.no_memory_message(rt), retry_after_s=5)
        raise ModelUnavailable(f"model {rt.key.model_id!r} did not become ready within {timeout_s:g} s")

    async def unload(self, rt: ModelRuntime, grace_s: float) -> None:
        """Drain the queue and let running batches finish (up to `grace_s`; then fail what is left),
        stop the worker (SIGKILL after `worker_stop_grace_s` if it does not exit), wait for it."""
        rt.load_requested = False
        if rt.state == ModelState.FAILED:  # an unload also stops the background retries
            rt.retry_at = None
            rt.poke()
        if not rt.loaded and rt.state not in (ModelState.LOADING, ModelState.WARMING):
            return
        worker = rt.worker
        rt.stop(StopReason.UNLOAD)
        with anyio.move_on_after(grace_s):
            while len(rt.queue) or rt.busy:
                await rt.changed.wait()
        if len(rt.queue):
            rt.queue.fail_all(ModelUnavailable(f"model {rt.key.model_id!r} was unloaded while this request waited"))
        rt.stop(StopReason.UNLOAD_NOW)
        for run in rt.running:  # the grace period is over: stop the running batches too (hung or slow)
            run.scope.cancel()
        # wait for that worker to be gone (a request arriving meanwhile may start a new one)
        while (worker is not None and rt.worker is worker) or rt.state == ModelState.UNLOADING:
            await rt.changed.wait()

    # -- status -----------------------------------------------------------------------------

    def budget_status(self) -> BudgetStatus:
        return self.admission.status()

    def status(self) -> list[ModelStatus]:
        now, wall = anyio.current_time(), time.time()
        return [model_status(rt, self.admission, now, wall) for rt in self.models.values()]

    def runtime_sample(self) -> RuntimeSample:
        """The gauges of `metrics`, read when Prometheus scrapes."""
        models = []
        for rt in list(self.models.values()):
            worker = rt.worker if rt.loaded else None
            by_priority = rt.queue.by_priority
            models.append(
                ModelSample(
                    rt.key.model_id,
                    rt.key.version,
                    rt.identity.task,
                    str(rt.state),
                    {p.name.lower(): by_priority[p] for p in Priority},
                    len(rt.running),
                    worker.pid if worker is not None else None,
                    int(rt.measured_mb * _MB) if worker is not None and rt.measured_mb is not None else None,
                    rt.device,
                    int(rt.measured_vram_mb * _MB) if worker is not None and rt.measured_vram_mb is not None else None,
                )
            )
        b, v = self.admission.budget, self.admission.vram
        return RuntimeSample(
            models,
            None if b.unlimited else b.budget_mb * _MB,
            b.used_mb() * _MB,
            b.shared_mb * _MB,
            None if v.unlimited else v.budget_mb * _MB,
            v.used_mb() * _MB,
        )
