"""The per-model task: one per model version, for as long as the server runs (or the model
stays installed).

It waits for work (queued requests, an explicit load, or a background retry after a failed
load); admits the load within the memory budget; starts the worker (load + test
inference), measures it and runs continuous batching on it until the worker crashes,
stalls, is evicted, unloaded, replaced, or stays idle for its keep_alive; then stops it and
releases the reservation. Queued requests stay and bring it back.

A failed load marks the model FAILED: requests fail fast (503 with Retry-After) while a
background retry runs with exponential backoff; a success clears the state; when the
attempts run out it stays failed until an explicit load. Anything unexpected in one model's
load or batches fails that model only: it is logged and counted, and the task goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import anyio
import structlog

from ..config import Settings
from ..errors import InsufficientMemory, ModelLoadFailed
from ..lifecycle import TRANSITIONS, ModelState, WorkerHandle, WorkerSpec
from ..observability import Metrics
from . import batching
from .admission import Admission
from .runtime import ModelIdentity, ModelRuntime, StopReason

__all__ = ("ModelSupervisor", "WorkerOpener")

log = structlog.get_logger("modelmora.scheduler")

WorkerOpener = Callable[[WorkerSpec, Callable[[str], None]], AbstractAsyncContextManager[WorkerHandle]]
"""Starts a worker for a spec (reporting its phases) and yields it once ready; stops it on exit."""


class ModelSupervisor:
    """Runs the per-model tasks of one scheduler."""

    def __init__(
        self, settings: Settings, admission: Admission, open_worker: WorkerOpener, *, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.admission = admission
        self.open_worker = open_worker
        self.metrics = metrics or admission.metrics
        self.unexpected_errors = 0

    async def serve(self, rt: ModelRuntime) -> None:
        """The model's task: returns once the model was uninstalled and its worker is gone."""
        while not rt.removed:
            try:
                await self._serve_once(rt)
            except Exception as exc:  # a bug: this model fails, the server and the other models go on
                self.unexpected_errors += 1
                log.error("model_task_failed", model=str(rt.key), errors=self.unexpected_errors, exc_info=exc)
                await self._after_unexpected(rt)

    async def _after_unexpected(self, rt: ModelRuntime) -> None:
        """Fail the model's waiting requests, mark it failed where its state allows, and pause
        before the task goes on (a bug that repeats must not spin)."""
        error = ModelLoadFailed(f"model {rt.key.model_id!r} failed unexpectedly (see the server log)")
        rt.last_error = error.message
        rt.queue.fail_all(error)
        if ModelState.FAILED in TRANSITIONS[rt.state]:
            self._load_failed(rt, error)
        await anyio.sleep(self.settings.load_retry_base_s)

    async def _serve_once(self, rt: ModelRuntime) -> None:
        if not await self._wait_for_work(rt):
            return
        if rt.crash_streak >= 2:  # it keeps crashing: back off before starting it again
            s = self.settings
            delay = min(s.load_retry_cap_s, s.load_retry_base_s * 2 ** (rt.crash_streak - 2))
            log.warning("restart_backoff", model=str(rt.key), crashes=rt.crash_streak, delay_s=delay)
            await anyio.sleep(delay)
            if not await self._wait_for_work(rt):  # uninstalled, or nobody waits, meanwhile
                return
        try:
            await self.admission.admit(rt)
        except InsufficientMemory as exc:
            if rt.state == ModelState.FAILED:  # a background retry found no room: a failed attempt
                self._load_failed(rt, ModelLoadFailed(exc.message))
                return
            rt.last_error = exc.message
            rt.queue.fail_all(exc)
            rt.load_requested = False
            rt.poke()
            return
        if rt.state != ModelState.FAILED and not len(rt.queue) and not rt.load_requested:
            self.admission.release(rt)  # everyone gave up while it made room (e.g. a victim's batch ran on)
            return
        try:
            await self._run_worker(rt)
        except ModelLoadFailed as exc:
            self._load_failed(rt, exc)
        finally:
            self.admission.release(rt)
            rt.worker = None
            rt.worker_identity = None
            rt.stop_reason = None
            if rt.state in (ModelState.READY, ModelState.LOADING, ModelState.WARMING, ModelState.UNLOADING):
                rt.set_state(ModelState.CACHED, "worker stopped")

    async def _wait_for_work(self, rt: ModelRuntime) -> bool:
        """Return True when there is work for a worker; False once the model was removed."""
        while not rt.removed:
            if rt.state == ModelState.FAILED:
                if rt.retry_at is not None and not rt.load_requested:
                    with anyio.move_on_after(max(0.0, rt.retry_at - anyio.current_time())):
                        await rt.changed.wait()
                        continue  # a load request, a settings change or removal: look again
                    log.info("model_retry_load", model=str(rt.key), attempt=rt.failures + 1)
                    return True
                if not rt.load_requested:
                    await rt.changed.wait()
                    continue
            if len(rt.queue) or rt.load_requested:
                return True
            await rt.queue.wait_change()
        return False

    def spec(self, rt: ModelRuntime) -> WorkerSpec:
        """What the next worker loads: the registry entry and settings as they are now."""
        ident = rt.identity
        return WorkerSpec(
            rt.key.model_id,
            rt.key.version,
            ident.path,
            ident.task,
            ident.pipeline,
            device=ident.device,
            dtype=ident.dtype,
            threads=self.settings.effective_torch_threads,
            streams=self.settings.inference_streams,
        )

    async def _run_worker(self, rt: ModelRuntime) -> None:
        reason = "retry" if rt.state == ModelState.FAILED else "explicit" if rt.load_requested else "request"
        self.metrics.loads.labels(rt.key.model_id, reason).inc()
        started = time.perf_counter()
        rt.set_state(ModelState.LOADING, "work waiting")

        def on_phase(phase: str) -> None:
            if phase == "warming":
                rt.set_state(ModelState.WARMING, "weights loaded, running the test inference")

        identity = rt.identity
        try:
            async with self.open_worker(self.spec(rt), on_phase) as worker:
                self.metrics.load_duration.labels(rt.key.model_id).observe(time.perf_counter() - started)
                await self._serve_worker(rt, worker, identity)
        except ModelLoadFailed:
            raise
        except Exception as exc:  # shared memory, a setting refused at start, a bug: this model fails only
            log.error("worker_failed_unexpectedly", model=str(rt.key), exc_info=exc)
            raise ModelLoadFailed(f"model {rt.key.model_id!r} failed unexpectedly (see the server log)") from exc

    async def _serve_worker(self, rt: ModelRuntime, worker: WorkerHandle, identity: ModelIdentity) -> None:
        rt.worker = worker
        rt.worker_identity = identity
        rt.loads += 1
        rt.failures = 0
        rt.retry_at = None
        rt.last_error = None
        rt.load_requested = False
        rt.device = worker.loaded.device if worker.loaded is not None else None
        if rt.metrics is not None:  # the worker's own time per batch, from its Result messages
            worker.on_infer_s = rt.metrics.inference.observe
        self.admission.record_vram(rt, worker.vram_bytes)
        await self.admission.measure(rt, worker.pid)
        rt.last_used = anyio.current_time()  # idle time counts from here
        rt.set_state(ModelState.READY)
        if rt.stale:
            rt.stop(StopReason.REPLACE)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch, worker, tg.cancel_scope)
            await batching.dispatch(rt, worker, self.settings, self._batch_done)
            tg.cancel_scope.cancel()
        if worker.crashed:
            rt.crashes += 1
            rt.crash_streak += 1
            how = "stalled and was killed" if worker.crash_reason == "stalled" else "exited unexpectedly"
            rt.last_error = f"worker {worker.pid} {how}"
            self.metrics.unloads.labels(
                rt.key.model_id, "stalled" if worker.crash_reason == "stalled" else "crashed"
            ).inc()
            rt.set_state(ModelState.CACHED, "worker crashed")
        else:
            reason = str(rt.stop_reason or "stopping")
            self.metrics.unloads.labels(rt.key.model_id, _unload_reason(rt)).inc()
            rt.set_state(ModelState.UNLOADING, reason)

    def _batch_done(self, rt: ModelRuntime, worker: WorkerHandle) -> None:
        self.admission.record_vram(rt, worker.vram_bytes)

    @staticmethod
    async def _watch(worker: WorkerHandle, scope: anyio.CancelScope) -> None:
        await worker.read_loop()
        scope.cancel()  # the worker is gone: stop dispatching to it

    def failed_error(self, rt: ModelRuntime) -> ModelLoadFailed:
        if rt.retry_at is not None:
            wait = max(1.0, rt.retry_at - anyio.current_time())
            return ModelLoadFailed(
                f"model {rt.key.model_id!r} failed to load ({rt.last_error}); retrying in {wait:.0f} s",
                retry_after_s=wait,
            )
        return ModelLoadFailed(
            f"model {rt.key.model_id!r} failed to load ({rt.last_error}); no retries left:"
            f" POST /api/v1/models/{rt.key.model_id}/load to try again",
            retry_after_s=None,
        )

    def _load_failed(self, rt: ModelRuntime, exc: ModelLoadFailed) -> None:
        s = self.settings
        self.metrics.load_failures.labels(rt.key.model_id).inc()
        rt.failures += 1
        rt.last_error = exc.message
        rt.load_requested = False
        if rt.failures < s.load_retry_attempts and not rt.removed:
            backoff = min(s.load_retry_cap_s, s.load_retry_base_s * 2 ** (rt.failures - 1))
            rt.retry_at = anyio.current_time() + backoff
        else:
            rt.retry_at = None
        rt.set_state(ModelState.FAILED, exc.message)
        rt.queue.fail_all(self.failed_error(rt))


def _unload_reason(rt: ModelRuntime) -> str:
    """The `reason` label of a worker that stopped as asked: explicit unloads (drained or not) are
    "unload", an uninstalled model's "uninstall", else the stop reason (evict, idle, replace)."""
    if rt.removed:
        return "uninstall"
    if rt.stop_reason in (StopReason.UNLOAD, StopReason.UNLOAD_NOW):
        return "unload"
    return str(rt.stop_reason or "stopping")
