"""The scheduler: one queue and one task per model version, within a memory budget.

`Scheduler.run()` owns a task group (inside the server's). The first request for a model
version (or a load request, or preload) starts that version's task, which:

1. waits for work (queued requests, an explicit load, or a background retry after a
   failed load);
2. admits the load: reserves the worker's estimated footprint in the `MemoryBudget`,
   evicting least-recently-used idle, unpinned models first (a victim finishes its
   running batch, then its worker is stopped and reaped before the reservation is made);
   when nothing can be evicted it waits for memory within its requests' deadlines;
3. starts the worker (load + test inference), measures its PSS, and dispatches batches to
   it (continuous batching: while the worker is busy, arrivals accumulate into the next
   batch), until the worker crashes, the model is evicted or unloaded, or it was idle for
   its `keep_alive`;
4. stops the worker and releases the reservation; queued requests stay and bring it back.

A failed load marks the model FAILED: requests fail fast (503 with Retry-After) while a
background retry runs with exponential backoff; a success clears the state; when the
attempts run out it stays failed until an explicit load.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import msgspec
import structlog

from ..config import ModelSettings, Settings
from ..errors import (
    InsufficientMemory,
    ModelLoadFailed,
    ModelMoraError,
    ModelUnavailable,
    WorkerCrashed,
)
from ..lifecycle import EventSink, ModelState, Outputs, TensorData, WorkerHandle, WorkerSpec
from ..lifecycle.budget import MemoryBudget, parse_keep_alive, pss_bytes
from ..registry import ModelStore
from .queues import ModelQueue
from .request import ModelKey, Request

__all__ = ("PIPELINES", "ModelRuntime", "Scheduler")

log = structlog.get_logger("modelmora.scheduler")
_MB = 2**20

PIPELINES: dict[str, str] = {
    "txt2embed": "modelmora_workers.pipelines.text_embedding:TextEmbedding",
    "img2embed": "modelmora_workers.pipelines.image_embedding:ImageEmbedding",
    "img2txt": "modelmora_workers.pipelines.image_to_text:ImageToText",
    "txt2txt": "modelmora_workers.pipelines.text_generation:TextGeneration",
    "txt2img": "modelmora_workers.pipelines.text_to_image:TextToImage",
}
"""Task type -> worker pipeline ("module:Class"), imported inside the worker process."""


@dataclass(eq=False)
class RunningBatch:
    """A batch in the worker."""

    requests: list[Request]
    abandoned: anyio.Event = field(default_factory=anyio.Event)
    """Set when every request of the batch was withdrawn: the worker is told to stop it."""


@dataclass(eq=False)
class ModelRuntime:
    """Everything the supervisor knows about one model version at run time."""

    key: ModelKey
    spec: WorkerSpec
    queue: ModelQueue
    model_settings: ModelSettings
    weights_bytes: int = 0
    state: ModelState = ModelState.CACHED
    worker: WorkerHandle | None = None
    running: list[RunningBatch] = field(default_factory=list)
    """The batches in the worker: one, or up to its inference streams."""
    stop_reason: str | None = None
    """Why the worker should stop: "evict", "unload" (drain first) or "unload-now"."""
    load_requested: bool = False
    waiting_for_memory: bool = False
    failures: int = 0
    retry_at: float | None = None
    last_used: float = 0.0
    last_error: str | None = None
    measured_mb: float | None = None
    measured_vram_mb: float | None = None
    device: str | None = None
    """The device its worker ran on last ("cpu", "cuda", "cuda:1"...), once known."""
    loads: int = 0
    crashes: int = 0
    crash_streak: int = 0
    """Crashes since the last batch that succeeded: restarts back off once it reaches 2."""
    evictions: int = 0
    served: int = 0
    batches: int = 0
    cancelled: int = 0
    history: list[tuple[float, str, str]] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)
    """Set (and replaced) on every state change and control request."""

    def set_state(self, state: ModelState, reason: str = "") -> None:
        if state != self.state:
            log.info("model_state", model=str(self.key), state=str(state), previous=str(self.state), reason=reason)
            self.state = state
            self.history.append((time.time(), str(state), reason))
            del self.history[:-50]
        self.poke()

    def poke(self) -> None:
        """Wake whoever waits on this model (its task, load/unload callers)."""
        self.changed.set()
        self.changed = anyio.Event()
        self.queue.interrupt()

    @property
    def busy(self) -> bool:
        """A batch is running in the worker (it pins the model)."""
        return bool(self.running)

    @property
    def pinned(self) -> bool:
        return bool(self.model_settings.pinned)

    @property
    def loaded(self) -> bool:
        return self.worker is not None and not self.worker.dead


def _read_pss(pids: list[int], shared: Any) -> tuple[list[int | None], int | None]:
    """PSS of each pid, and of the shared processes (the zygote) when `shared` is callable."""
    return [pss_bytes(pid) for pid in pids], (shared() if callable(shared) else None)


class Scheduler:
    """Queues requests per model version and runs them on that version's worker."""

    def __init__(
        self,
        settings: Settings,
        instance_id: str,
        *,
        pipelines: dict[str, str] | None = None,
        worker_env: dict[str, str] | None = None,
        clock: Callable[[], float] | None = None,
        launcher: Any = None,
    ) -> None:
        self.settings = settings
        self.instance_id = instance_id
        self.pipelines = {**PIPELINES, **settings.pipelines, **(pipelines or {})}
        self.worker_env = worker_env
        self.clock = clock
        self.launcher = launcher
        self.budget = MemoryBudget(
            settings.effective_memory_budget_mb,
            settings.admission_factor,
            settings.worker_base_mb or 400.0,
        )
        self.vram = MemoryBudget(max(0.0, settings.vram_budget_mb), settings.admission_factor, 0.0)
        """GPU memory of the workers (torch's reserved pools, as they report them); 0: not limited."""
        self._learn_base = settings.worker_base_mb <= 0
        self.models: dict[ModelKey, ModelRuntime] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._closing = False
        self._stop = anyio.Event()
        self._capacity = anyio.Event()

    def close(self) -> None:
        """Stop accepting requests and make `run()` stop every worker and return."""
        self._stop.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the per-model tasks and the memory monitor until `close()`; then stop every worker."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._monitor, name="memory monitor")
            task_status.started()
            try:
                await self._stop.wait()
            finally:
                self._closing = True
                for rt in self.models.values():
                    rt.queue.fail_all(ModelUnavailable("the server is shutting down"))
                tg.cancel_scope.cancel()

    # -- entry points --------------------------------------------------------------------

    def runtime(
        self, key: ModelKey, *, task: str, path: str, settings: ModelSettings, weights_bytes: int = 0
    ) -> ModelRuntime:
        """The runtime of a model version, created (and its task started) on first use.

        `settings` are the model's registry overrides; batching and queue settings apply
        from the next batch, device and dtype from the next worker start.
        """
        rt = self.models.get(key)
        if rt is not None and rt.model_settings is not settings:
            rt.model_settings = settings
            rt.queue.limit = settings.queue_limit or self.settings.queue_limit
            rt.poke()
        if rt is None:
            if self._tg is None or self._closing:
                raise ModelUnavailable("the server is not accepting requests")
            pipeline = self.pipelines.get(task)
            if pipeline is None:
                raise ModelUnavailable(f"task type {task!r} of model {key.model_id!r} is not supported yet")
            spec = WorkerSpec(
                key.model_id,
                key.version,
                path,
                task,
                pipeline,
                device=settings.device or "auto",
                dtype=settings.dtype or "auto",
                threads=self.settings.effective_torch_threads,
                streams=self.settings.inference_streams,
            )
            queue = ModelQueue(
                settings.queue_limit or self.settings.queue_limit, self.clock, self.settings.priority_aging_ms / 1000
            )
            rt = ModelRuntime(key, spec, queue, settings, weights_bytes)
            self.models[key] = rt
            self._tg.start_soon(self._serve, rt, name=f"model {key}")
        return rt

    def submit(self, rt: ModelRuntime, req: Request) -> None:
        """Queue `req` on its model.

        Raises:
            QueueFull: the model's queue is at its limit.
            ModelLoadFailed: the model is failed (503 at once; a retry may be scheduled).
        """
        if self._closing:
            raise ModelUnavailable("the server is shutting down")
        if rt.state == ModelState.FAILED:
            raise self._failed_error(rt)
        rt.queue.put_nowait(req)
        rt.last_used = time.time()

    @staticmethod
    def withdraw(rt: ModelRuntime, req: Request) -> None:
        """The caller gave up (deadline, disconnect): drop it from the queue, or drop its result.

        When nobody waits for any request of a running batch any more, the worker is told
        to stop it at the pipeline's next step (long generations free the worker early).
        """
        if not req.done.is_set():
            req.cancel()
            rt.queue.discard(req)
            rt.cancelled += 1
            for run in rt.running:
                if req in run.requests and all(r.cancelled for r in run.requests):
                    run.abandoned.set()

    async def preload(self, store: ModelStore) -> list[str]:
        """Start loading (without waiting) every model whose settings say `preload`."""
        started = []
        for rec in await store.alist():
            model_settings = msgspec.convert(rec.settings, ModelSettings)
            vrec = rec.version_record()
            if not model_settings.preload or vrec is None or rec.task not in self.pipelines:
                continue
            rt = self.runtime(
                ModelKey(rec.id, vrec.version),
                task=rec.task,
                path=vrec.path,
                settings=model_settings,
                weights_bytes=vrec.size_bytes,
            )
            rt.load_requested = True
            rt.poke()
            started.append(str(rt.key))
        if started:
            log.info("preloading", models=started)
        return started

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
        rt.load_requested = True
        rt.poke()
        with anyio.move_on_after(timeout_s):
            while True:
                if rt.loaded and rt.state == ModelState.READY:
                    return
                if rt.state == ModelState.FAILED:
                    raise self._failed_error(rt)
                await rt.changed.wait()
        if rt.waiting_for_memory:
            raise InsufficientMemory(self._no_memory_message(rt), retry_after_s=5)
        raise ModelUnavailable(f"model {rt.key.model_id!r} did not become ready within {timeout_s:g} s")

    async def unload(self, rt: ModelRuntime, grace_s: float) -> None:
        """Drain the queue (up to `grace_s`; then fail what is left), stop the worker, wait for it."""
        rt.load_requested = False
        if not rt.loaded and rt.state != ModelState.LOADING:
            return
        worker = rt.worker
        rt.stop_reason = "unload"
        rt.poke()
        with anyio.move_on_after(grace_s):
            while len(rt.queue) or rt.busy:
                await rt.changed.wait()
        if len(rt.queue):
            rt.queue.fail_all(ModelUnavailable(f"model {rt.key.model_id!r} was unloaded while this request waited"))
        rt.stop_reason = "unload-now"
        rt.poke()
        # wait for that worker to be gone (a request arriving meanwhile may start a new one)
        while (worker is not None and rt.worker is worker) or rt.state == ModelState.UNLOADING:
            await rt.changed.wait()

    # -- the model's task ------------------------------------------------------------------

    async def _serve(self, rt: ModelRuntime) -> None:
        while True:
            await self._wait_for_work(rt)
            if rt.crash_streak >= 2:  # it keeps crashing: back off before starting it again
                s = self.settings
                delay = min(s.load_retry_cap_s, s.load_retry_base_s * 2 ** (rt.crash_streak - 2))
                log.warning("restart_backoff", model=str(rt.key), crashes=rt.crash_streak, delay_s=delay)
                await anyio.sleep(delay)
            try:
                await self._admit(rt)
            except InsufficientMemory as exc:
                rt.last_error = exc.message
                rt.queue.fail_all(exc)
                rt.load_requested = False
                rt.poke()
                continue
            try:
                await self._run_worker(rt)
            except ModelLoadFailed as exc:
                self._load_failed(rt, exc)
            finally:
                self.budget.release(rt.key)
                self.vram.release(rt.key)
                rt.worker = None
                rt.stop_reason = None
                if rt.state in (ModelState.READY, ModelState.LOADING, ModelState.UNLOADING):
                    rt.set_state(ModelState.CACHED, "worker stopped")
                self._capacity_changed()

    async def _wait_for_work(self, rt: ModelRuntime) -> None:
        while True:
            if rt.state == ModelState.FAILED:
                if rt.retry_at is not None and not rt.load_requested:
                    with anyio.move_on_after(max(0.0, rt.retry_at - time.monotonic())):
                        await rt.changed.wait()
                        continue  # a load request or a settings change: look again
                    log.info("model_retry_load", model=str(rt.key), attempt=rt.failures + 1)
                    return
                if not rt.load_requested:
                    await rt.changed.wait()
                    continue
            if len(rt.queue) or rt.load_requested:
                return
            await rt.queue.wait_change()

    def _failed_error(self, rt: ModelRuntime) -> ModelLoadFailed:
        if rt.retry_at is not None:
            wait = max(1.0, rt.retry_at - time.monotonic())
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
        rt.failures += 1
        rt.last_error = exc.message
        rt.load_requested = False
        if rt.failures < s.load_retry_attempts:
            backoff = min(s.load_retry_cap_s, s.load_retry_base_s * 2 ** (rt.failures - 1))
            rt.retry_at = time.monotonic() + backoff
        else:
            rt.retry_at = None
        rt.set_state(ModelState.FAILED, exc.message)
        rt.queue.fail_all(self._failed_error(rt))

    # -- memory admission ------------------------------------------------------------------

    def _need_mb(self, rt: ModelRuntime) -> float:
        if rt.measured_mb is not None:  # measured on an earlier load of this version (+10% for load peaks)
            return rt.measured_mb * 1.1
        return self.budget.estimate_mb(rt.weights_bytes)

    def _need_vram_mb(self, rt: ModelRuntime) -> float:
        """GPU memory to reserve before starting `rt`'s worker (0 when VRAM is not limited or it runs on CPU)."""
        if self.vram.unlimited:
            return 0.0
        on_gpu = rt.device.startswith("cuda") if rt.device is not None else rt.spec.device != "cpu"
        if not on_gpu:
            return 0.0
        if rt.measured_vram_mb is not None:
            return rt.measured_vram_mb * 1.1
        return self.vram.estimate_mb(rt.weights_bytes)

    def _no_memory_message(self, rt: ModelRuntime) -> str:
        v = self.vram
        need_vram = self._need_vram_mb(rt)
        if need_vram and not v.fits(need_vram):
            return (
                f"insufficient GPU memory to load model {rt.key.model_id!r}: it needs ~{need_vram:.0f} MiB,"
                f" {v.free_mb():.0f} of {v.budget_mb:.0f} MiB (vram_budget_mb) are free and no loaded GPU model"
                " can be evicted (all busy or pinned)"
            )
        b = self.budget
        return (
            f"insufficient memory to load model {rt.key.model_id!r}: it needs ~{self._need_mb(rt):.0f} MiB,"
            f" {b.free_mb():.0f} of {b.budget_mb:.0f} MiB are free and no loaded model can be evicted"
            " (all busy or pinned)"
        )

    def _capacity_changed(self) -> None:
        self._capacity.set()
        self._capacity = anyio.Event()

    def _victim(self, exclude: ModelRuntime | None, *, gpu: bool = False) -> ModelRuntime | None:
        """The least recently used loaded model that may be evicted, idle ones first (`gpu`: holding VRAM)."""
        candidates = [
            rt
            for rt in self.models.values()
            if rt is not exclude
            and rt.loaded
            and not rt.pinned
            and rt.stop_reason is None
            and (not gpu or self.vram.reserved_mb(rt.key))
        ]
        if not candidates:
            return None
        return min(candidates, key=lambda rt: (rt.busy, rt.last_used))

    async def _admit(self, rt: ModelRuntime) -> None:
        """Reserve memory for `rt`'s worker, evicting LRU models or waiting for room.

        Raises:
            InsufficientMemory: it can never fit, or no room came before its requests' deadlines.
        """
        need = self._need_mb(rt)
        need_vram = self._need_vram_mb(rt)
        budget, vram = self.budget, self.vram
        if not budget.unlimited and need > budget.budget_mb - budget.shared_mb:
            raise InsufficientMemory(
                f"model {rt.key.model_id!r} needs ~{need:.0f} MiB, more than the whole worker budget"
                f" ({budget.budget_mb:.0f} MiB; raise memory_budget_mb)"
            )
        if need_vram > vram.budget_mb > 0:
            raise InsufficientMemory(
                f"model {rt.key.model_id!r} needs ~{need_vram:.0f} MiB of GPU memory, more than the whole GPU"
                f" budget ({vram.budget_mb:.0f} MiB; raise vram_budget_mb or run it on the CPU)"
            )
        try:
            while not (budget.fits(need) and vram.fits(need_vram)):
                if not len(rt.queue) and not rt.load_requested:
                    raise InsufficientMemory(self._no_memory_message(rt))  # nobody waits any more
                victim = self._victim(rt, gpu=budget.fits(need))
                if victim is not None:
                    log.info("evicting", model=str(victim.key), for_model=str(rt.key), need_mb=round(need))
                    victim.stop_reason = "evict"
                    victim.evictions += 1
                    victim.poke()
                    while victim.loaded or victim.state == ModelState.UNLOADING:
                        await victim.changed.wait()
                    continue
                rt.waiting_for_memory = True
                rt.poke()
                capacity = self._capacity
                with anyio.move_on_after(1.0):  # re-check the queue (deadlines) at least every second
                    await capacity.wait()
            budget.reserve(rt.key, need)
            if need_vram:
                vram.reserve(rt.key, need_vram)
        finally:
            if rt.waiting_for_memory:
                rt.waiting_for_memory = False
                rt.poke()

    # -- running a worker --------------------------------------------------------------------

    async def _run_worker(self, rt: ModelRuntime) -> None:
        settings = self.settings
        rt.set_state(ModelState.LOADING, "work waiting")
        extra: dict[str, Any] = {} if self.launcher is None else {"launcher": self.launcher}

        def on_phase(phase: str) -> None:
            if phase == "warming":
                rt.set_state(ModelState.WARMING, "weights loaded, running the test inference")

        async with WorkerHandle.open(
            rt.spec,
            instance_id=self.instance_id,
            request_ring_bytes=settings.request_ring_mb * _MB,
            response_ring_bytes=settings.response_ring_mb * _MB,
            start_timeout_s=settings.worker_start_timeout_s,
            stop_grace_s=settings.worker_stop_grace_s,
            env=self.worker_env,
            on_phase=on_phase,
            **extra,
        ) as worker:
            rt.worker = worker
            rt.loads += 1
            rt.failures = 0
            rt.retry_at = None
            rt.last_error = None
            rt.load_requested = False
            rt.device = worker.loaded.device if worker.loaded is not None else None
            self._record_vram(rt, worker)
            await self._measure(rt)
            rt.set_state(ModelState.READY)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch, worker, tg.cancel_scope)
                await self._dispatch(rt, worker)
                tg.cancel_scope.cancel()
            if worker.crashed:
                rt.crashes += 1
                rt.crash_streak += 1
                rt.last_error = f"worker {worker.pid} exited unexpectedly"
                rt.set_state(ModelState.CACHED, "worker crashed")
            else:
                rt.set_state(ModelState.UNLOADING, rt.stop_reason or "stopping")

    async def _measure(self, rt: ModelRuntime) -> None:
        if rt.worker is None:
            return
        # reading smaps_rollup walks every mapping (~16 ms for a 900 MB worker): off the event loop
        pss = await anyio.to_thread.run_sync(pss_bytes, rt.worker.pid)
        if pss is None:
            return
        self._record(rt, pss)

    def _record_vram(self, rt: ModelRuntime, worker: WorkerHandle) -> None:
        """Replace the VRAM estimate by what the worker reports (none is held on the CPU)."""
        if rt.device is not None and not rt.device.startswith("cuda"):
            self.vram.release(rt.key)
            return
        rt.measured_vram_mb = worker.vram_bytes / _MB
        self.vram.measure(rt.key, rt.measured_vram_mb)

    def _record(self, rt: ModelRuntime, pss: int) -> None:
        rt.measured_mb = pss / _MB
        self.budget.measure(rt.key, rt.measured_mb)
        if self._learn_base:
            self.budget.learn_base(rt.measured_mb, rt.weights_bytes)

    @staticmethod
    async def _watch(worker: WorkerHandle, scope: anyio.CancelScope) -> None:
        await worker.read_loop()
        scope.cancel()  # the worker is gone: stop dispatching to it

    def _keep_alive_s(self, rt: ModelRuntime) -> float | None:
        value = rt.model_settings.keep_alive
        return parse_keep_alive(value if value is not None else self.settings.keep_alive)

    async def _dispatch(self, rt: ModelRuntime, worker: WorkerHandle) -> None:
        """Continuous batching until the worker dies, is stopped, or stays idle for keep_alive.

        A worker with several inference streams gets a further batch while others run only
        when a full one (`max_batch_size` items) waits: light load keeps one batch at a time,
        on all the worker's threads, and arrivals during a batch join the next one.
        """
        queue = rt.queue
        async with anyio.create_task_group() as tg:
            while not worker.dead:
                if rt.stop_reason in ("evict", "unload-now") or (rt.stop_reason == "unload" and not len(queue)):
                    break  # batches still running finish first
                max_items = rt.model_settings.max_batch_size or self.settings.max_batch_size
                if rt.running:
                    if len(rt.running) >= worker.streams or queue.items < max_items:
                        await queue.wait_change()  # a batch finished (it pokes) or requests arrived
                        continue
                elif not len(queue):
                    keep_alive = self._keep_alive_s(rt)
                    with anyio.move_on_after(math.inf if keep_alive is None else keep_alive) as idle:
                        while not len(queue) and rt.stop_reason is None:
                            await queue.wait_change()
                    if idle.cancelled_caught:
                        rt.stop_reason = "idle"
                        log.info("idle_unload", model=str(rt.key), keep_alive_s=keep_alive)
                        break
                    continue
                else:
                    max_wait_ms = rt.model_settings.max_wait_ms
                    max_wait_s = (self.settings.max_wait_ms if max_wait_ms is None else max_wait_ms) / 1000
                    if max_wait_s > 0 and queue.items < max_items:
                        with anyio.move_on_after(max_wait_s):
                            await queue.wait_fuller(max_items)
                batch = queue.take_batch(max_items)
                if batch:
                    run = RunningBatch(batch)
                    rt.running.append(run)
                    tg.start_soon(self._run_batch, rt, worker, run, max_items)

    async def _run_batch(self, rt: ModelRuntime, worker: WorkerHandle, run: RunningBatch, max_items: int) -> None:
        batch = run.requests
        now = time.perf_counter()
        inputs: dict[str, list[Any]] = {name: [] for name in batch[0].inputs}
        for req in batch:
            req.dispatched_at = now
            for name, values in req.inputs.items():
                inputs[name].extend(values)
        params = dict(batch[0].params)
        params["batch_size"] = max_items
        rt.batches += 1
        bid = worker.new_batch_id()

        async def cancel_when_abandoned() -> None:
            await run.abandoned.wait()
            log.info("batch_cancelled", model=str(rt.key), batch=bid)
            await worker.cancel(bid)

        try:
            error: ModelMoraError | None = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_when_abandoned)
                try:
                    outputs = await worker.infer(inputs, params, batch_id=bid, on_event=self._event_router(batch))
                except ModelMoraError as exc:
                    error = exc
                tg.cancel_scope.cancel()
            if error is None:
                self._record_vram(rt, worker)
                self._deliver(batch, outputs)
                rt.crash_streak = 0
                rt.served += len(batch)
                rt.last_used = time.time()
            else:
                for req in batch:
                    req.set_error(error)
        finally:
            rt.running.remove(run)
            rt.poke()
            if any(not r.done.is_set() for r in batch):
                err: ModelMoraError = (
                    WorkerCrashed(
                        f"the worker of model {rt.key.model_id!r} exited while running this request",
                        retry_after_s=1.0,
                    )
                    if worker.dead and worker.crashed
                    else ModelUnavailable(f"model {rt.key.model_id!r} stopped before this request finished")
                )
                for req in batch:
                    req.set_error(err)

    @staticmethod
    def _event_router(batch: list[Request]) -> EventSink | None:
        """Route a batch's events (by item index in the batch) to the requests that listen."""
        if all(req.on_event is None for req in batch):
            return None
        owners: list[tuple[Request, int]] = [(req, i) for req in batch for i in range(req.size)]

        def route(item: int, kind: str, data: dict[str, Any]) -> None:
            targets = [(req, -1) for req in batch] if item < 0 else owners[item : item + 1]
            for req, local in targets:
                if req.on_event is not None and not req.cancelled:
                    req.on_event(local, kind, data)

        return route

    @staticmethod
    def _deliver(batch: list[Request], outputs: Outputs) -> None:
        """Split each output of the batch into its requests' items (outputs have one entry per item)."""
        pos = 0
        for req in batch:
            end = pos + req.size
            req.set_result(
                {
                    name: out.slice_rows(pos, end) if isinstance(out, TensorData) else out[pos:end]
                    for name, out in outputs.items()
                }
            )
            pos = end

    # -- memory monitor ----------------------------------------------------------------------

    async def _monitor(self) -> None:
        """Refresh measured PSS; if the budget is exceeded, evict LRU idle models at once.

        The /proc reads run in a worker thread: they cost milliseconds per large process and
        would otherwise stall every request on the event loop.
        """
        interval = self.settings.memory_poll_ms / 1000
        shared = getattr(self.launcher, "shared_pss_bytes", None)
        while True:
            await anyio.sleep(interval)
            live = [(rt, rt.worker.pid) for rt in self.models.values() if rt.worker is not None and rt.loaded]

            values, shared_bytes = await anyio.to_thread.run_sync(_read_pss, [pid for _, pid in live], shared)
            for (rt, pid), pss in zip(live, values, strict=True):
                if pss is not None and rt.worker is not None and rt.worker.pid == pid and rt.state == ModelState.READY:
                    self._record(rt, pss)
            if callable(shared):
                self.budget.shared_mb = (shared_bytes or 0) / _MB
            for budget, gpu in ((self.budget, False), (self.vram, True)):
                if budget.unlimited or budget.used_mb() <= budget.budget_mb:
                    continue
                victim = self._victim(exclude=None, gpu=gpu)
                if victim is not None and not victim.busy:
                    log.warning(
                        "over_budget_evicting", model=str(victim.key), used_mb=round(budget.used_mb()), vram=gpu
                    )
                    victim.stop_reason = "evict"
                    victim.evictions += 1
                    victim.poke()

    # -- status -----------------------------------------------------------------------------

    def budget_status(self) -> dict[str, Any]:
        b = self.budget
        return {
            "memory_budget_mb": None if b.unlimited else round(b.budget_mb, 1),
            "used_mb": round(b.used_mb(), 1),
            "free_mb": None if b.unlimited else round(b.free_mb(), 1),
            "shared_mb": round(b.shared_mb, 1),
            "worker_base_mb": round(b.base_mb, 1),
            "vram_budget_mb": None if self.vram.unlimited else round(self.vram.budget_mb, 1),
            "vram_used_mb": round(self.vram.used_mb(), 1),
            "vram_free_mb": None if self.vram.unlimited else round(self.vram.free_mb(), 1),
        }

    def status(self) -> list[dict[str, Any]]:
        out = []
        for rt in self.models.values():
            entry: dict[str, Any] = {
                "model_id": rt.key.model_id,
                "version": rt.key.version,
                "task_type": rt.spec.task,
                "state": str(rt.state),
                "pinned": rt.pinned,
                "queue_depth": len(rt.queue),
                "queued_items": rt.queue.items,
                "busy": rt.busy,
                "waiting_for_memory": rt.waiting_for_memory,
                "reserved_mb": None if (r := self.budget.reserved_mb(rt.key)) is None else round(r, 1),
                "measured_mb": None if rt.measured_mb is None else round(rt.measured_mb, 1),
                "device": rt.device,
                "vram_reserved_mb": None if (v := self.vram.reserved_mb(rt.key)) is None else round(v, 1),
                "vram_mb": None if rt.measured_vram_mb is None else round(rt.measured_vram_mb, 1),
                "last_used": rt.last_used or None,
                "last_error": rt.last_error,
                "failures": rt.failures,
                "retry_in_s": None if rt.retry_at is None else round(max(0.0, rt.retry_at - time.monotonic()), 1),
                "loads": rt.loads,
                "crashes": rt.crashes,
                "evictions": rt.evictions,
                "served": rt.served,
                "batches": rt.batches,
                "cancelled": rt.cancelled,
                "history": [{"at": at, "state": st, "reason": why} for at, st, why in rt.history[-10:]],
            }
            if rt.worker is not None:
                entry["worker"] = rt.worker.statistics()
            out.append(entry)
        return out
