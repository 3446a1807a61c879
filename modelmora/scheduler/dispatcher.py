"""The scheduler: one queue and one dispatch task per model version.

`Scheduler.run()` owns a task group (started inside the server's); the first request for
a model version starts that version's task, which starts its worker (lazily), then forms
batches from the queue and sends them to the worker one at a time (continuous batching:
while the worker is busy, arrivals accumulate into the next batch). A worker that dies
fails exactly the batch it held; queued requests stay and start a fresh worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import structlog

from ..config import ModelSettings, Settings
from ..errors import ModelLoadFailed, ModelMoraError, ModelUnavailable, WorkerCrashed
from ..lifecycle import ModelState, TensorData, WorkerHandle, WorkerSpec
from .queues import ModelQueue
from .request import ModelKey, Request

__all__ = ("PIPELINES", "Scheduler")

log = structlog.get_logger("modelmora.scheduler")

PIPELINES: dict[str, str] = {
    "txt2embed": "modelmora_workers.pipelines.text_embedding:TextEmbedding",
}
"""Task type -> worker pipeline ("module:Class"), imported inside the worker process."""


@dataclass(eq=False)
class ModelRuntime:
    """Everything the supervisor knows about one model version at run time."""

    key: ModelKey
    spec: WorkerSpec
    queue: ModelQueue
    model_settings: ModelSettings
    state: ModelState = ModelState.CACHED
    worker: WorkerHandle | None = None
    last_used: float = 0.0
    last_error: str | None = None
    loads: int = 0
    crashes: int = 0
    served: int = 0
    batches: int = 0
    cancelled: int = 0
    history: list[tuple[float, str]] = field(default_factory=list)

    def set_state(self, state: ModelState, reason: str = "") -> None:
        if state != self.state:
            log.info("model_state", model=str(self.key), state=str(state), previous=str(self.state), reason=reason)
            self.state = state
            self.history.append((time.time(), str(state)))
            del self.history[:-20]


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
    ) -> None:
        self.settings = settings
        self.instance_id = instance_id
        self.pipelines = {**PIPELINES, **settings.pipelines, **(pipelines or {})}
        self.worker_env = worker_env
        self.clock = clock
        self.models: dict[ModelKey, ModelRuntime] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._closing = False
        self._stop = anyio.Event()

    def close(self) -> None:
        """Stop accepting requests and make `run()` stop every worker and return."""
        self._stop.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the per-model tasks until cancelled; then stop every worker."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            try:
                await self._stop.wait()
            finally:
                self._closing = True
                for rt in self.models.values():
                    rt.queue.fail_all(ModelUnavailable("the server is shutting down"))
                tg.cancel_scope.cancel()

    def runtime(self, key: ModelKey, *, task: str, path: str, settings: ModelSettings) -> ModelRuntime:
        """The runtime of a model version, created (and its task started) on first use.

        `settings` are the model's registry overrides; batching and queue settings apply
        from the next batch, device and dtype from the next worker start.
        """
        rt = self.models.get(key)
        if rt is not None and rt.model_settings is not settings:
            rt.model_settings = settings
            rt.queue.limit = settings.queue_limit or self.settings.queue_limit
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
            )
            queue = ModelQueue(
                settings.queue_limit or self.settings.queue_limit, self.clock, self.settings.priority_aging_ms / 1000
            )
            rt = ModelRuntime(key, spec, queue, settings)
            self.models[key] = rt
            self._tg.start_soon(self._serve, rt, name=f"model {key}")
        return rt

    def submit(self, rt: ModelRuntime, req: Request) -> None:
        """Queue `req` on its model.

        Raises:
            QueueFull: the model's queue is at its limit.
        """
        if self._closing:
            raise ModelUnavailable("the server is shutting down")
        rt.queue.put_nowait(req)
        rt.last_used = time.time()

    @staticmethod
    def withdraw(rt: ModelRuntime, req: Request) -> None:
        """The caller gave up (deadline, disconnect): drop it from the queue, or drop its result."""
        if not req.done.is_set():
            req.cancel()
            rt.queue.discard(req)
            rt.cancelled += 1

    # -- per-model task -----------------------------------------------------------------

    async def _serve(self, rt: ModelRuntime) -> None:
        settings = self.settings
        while True:
            await rt.queue.wait_nonempty()
            rt.set_state(ModelState.LOADING, "request waiting")
            try:
                async with WorkerHandle.open(
                    rt.spec,
                    instance_id=self.instance_id,
                    request_ring_bytes=settings.request_ring_mb * 2**20,
                    response_ring_bytes=settings.response_ring_mb * 2**20,
                    start_timeout_s=settings.worker_start_timeout_s,
                    stop_grace_s=settings.worker_stop_grace_s,
                    env=self.worker_env,
                ) as worker:
                    rt.worker = worker
                    rt.loads += 1
                    rt.last_error = None
                    rt.set_state(ModelState.READY)
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._watch, worker, tg.cancel_scope)
                        await self._dispatch(rt, worker)
                    if worker.crashed:
                        rt.crashes += 1
                        rt.last_error = f"worker {worker.pid} exited unexpectedly"
                        rt.set_state(ModelState.CACHED, "worker crashed")
            except ModelLoadFailed as exc:
                rt.last_error = exc.message
                rt.set_state(ModelState.FAILED, exc.message)
                rt.queue.fail_all(exc)
            finally:
                rt.worker = None
                if rt.state in (ModelState.READY, ModelState.LOADING):
                    rt.set_state(ModelState.CACHED, "worker stopped")

    @staticmethod
    async def _watch(worker: WorkerHandle, scope: anyio.CancelScope) -> None:
        await worker.read_loop()
        scope.cancel()  # the worker is gone: stop dispatching to it

    async def _dispatch(self, rt: ModelRuntime, worker: WorkerHandle) -> None:
        """Continuous batching: take what is waiting whenever the worker is free."""
        while not worker.dead:
            await rt.queue.wait_nonempty()
            max_items = rt.model_settings.max_batch_size or self.settings.max_batch_size
            max_wait_ms = rt.model_settings.max_wait_ms
            max_wait_s = (self.settings.max_wait_ms if max_wait_ms is None else max_wait_ms) / 1000
            if max_wait_s > 0 and rt.queue.items < max_items:
                with anyio.move_on_after(max_wait_s):
                    await rt.queue.wait_fuller(max_items)
            batch = rt.queue.take_batch(max_items)
            if batch:
                await self._run_batch(rt, worker, batch, max_items)

    async def _run_batch(self, rt: ModelRuntime, worker: WorkerHandle, batch: list[Request], max_items: int) -> None:
        now = time.perf_counter()
        texts: list[str] = []
        for req in batch:
            req.dispatched_at = now
            texts.extend(req.texts)
        params = dict(batch[0].params)
        params["batch_size"] = max_items
        rt.batches += 1
        try:
            outputs = await worker.infer({"text": texts}, params)
            self._deliver(batch, outputs)
            rt.served += len(batch)
            rt.last_used = time.time()
        except ModelMoraError as exc:
            for req in batch:
                req.set_error(exc)
        finally:
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
    def _deliver(batch: list[Request], outputs: dict[str, TensorData]) -> None:
        emb = outputs["embeddings"]
        dim = emb.shape[1]
        row = dim * 4
        pos = 0
        for req in batch:
            k = req.size
            req.set_result(TensorData(emb.dtype, (k, dim), emb.data[pos * row : (pos + k) * row]))
            pos += k

    # -- status -------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        out = []
        for rt in self.models.values():
            entry: dict[str, Any] = {
                "model_id": rt.key.model_id,
                "version": rt.key.version,
                "task_type": rt.spec.task,
                "state": str(rt.state),
                "queue_depth": len(rt.queue),
                "last_used": rt.last_used or None,
                "last_error": rt.last_error,
                "queued_items": rt.queue.items,
                "loads": rt.loads,
                "crashes": rt.crashes,
                "served": rt.served,
                "batches": rt.batches,
                "cancelled": rt.cancelled,
            }
            if rt.worker is not None:
                entry["worker"] = rt.worker.statistics()
            out.append(entry)
        return out
