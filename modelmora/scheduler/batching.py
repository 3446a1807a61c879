"""Continuous batching for one model version's worker.

While the worker is busy, arrivals accumulate into its next batch; an idle worker takes
what is queued at once (or waits up to `max_wait_ms` for a fuller batch). A worker with
several inference streams gets a further batch while others run only when a full one
(`max_batch_size` items) waits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Protocol

import anyio
import structlog

from ..config import Settings
from ..errors import ModelMoraError, ModelUnavailable, WorkerCrashed
from ..lifecycle import EventSink, Outputs, TensorData
from ..lifecycle.budget import parse_keep_alive
from .request import Request
from .runtime import ModelRuntime, RunningBatch, StopReason

__all__ = ("BatchWorker", "abandon_if_unwanted", "dispatch", "keep_alive_s")

log = structlog.get_logger("modelmora.scheduler")


class BatchWorker(Protocol):
    """What batching needs of a worker (`lifecycle.WorkerHandle`, or a fake in policy tests)."""

    @property
    def dead(self) -> bool: ...

    @property
    def crashed(self) -> bool: ...

    @property
    def streams(self) -> int: ...

    def new_batch_id(self) -> int: ...

    async def infer(
        self,
        inputs: dict[str, list[Any]],
        params: dict[str, Any],
        *,
        batch_id: int | None = None,
        on_event: EventSink | None = None,
        trace_ids: Sequence[str] = (),
    ) -> Outputs: ...


def keep_alive_s(rt: ModelRuntime, settings: Settings) -> float | None:
    """How long the model's worker may stay idle (None: forever)."""
    value = rt.model_settings.keep_alive
    return parse_keep_alive(value if value is not None else settings.keep_alive)


def _max_items(rt: ModelRuntime, settings: Settings) -> int:
    return rt.model_settings.max_batch_size or settings.max_batch_size


async def dispatch(rt: ModelRuntime, worker: BatchWorker, settings: Settings, on_batch_done: Any) -> None:
    """Continuous batching until the worker dies, is asked to stop, or stays idle for keep_alive.

    Batches still running when it decides to stop finish first. `on_batch_done(rt, worker)`
    runs after each successful batch (the scheduler records the worker's VRAM there).
    """
    queue = rt.queue
    async with anyio.create_task_group() as tg:
        while not worker.dead:
            reason = rt.stop_reason
            if reason is not None and not (reason.drains and len(queue)):
                break
            max_items = _max_items(rt, settings)
            if rt.running:
                if len(rt.running) >= worker.streams or queue.items < max_items:
                    await queue.wait_change()  # a batch finished (it pokes) or requests arrived
                    continue
            elif not len(queue):
                # idle: until keep_alive after the last use (a settings change wakes it to look again)
                keep_alive = keep_alive_s(rt, settings)
                idle_until = math.inf if keep_alive is None else rt.last_used + keep_alive
                if queue.clock() >= idle_until:
                    log.info("idle_unload", model=str(rt.key), keep_alive_s=keep_alive)
                    rt.stop(StopReason.IDLE)
                    break
                with anyio.CancelScope(deadline=idle_until):
                    await queue.wait_change()
                continue
            else:
                max_wait_ms = rt.model_settings.max_wait_ms
                max_wait_s = (settings.max_wait_ms if max_wait_ms is None else max_wait_ms) / 1000
                if max_wait_s > 0 and queue.items < max_items:
                    with anyio.move_on_after(max_wait_s):
                        await queue.wait_fuller(max_items)
            batch = queue.take_batch(max_items)
            if batch:
                run = RunningBatch(batch)
                rt.running.append(run)
                tg.start_soon(_run_batch, rt, worker, run, max_items, on_batch_done)


async def _run_batch(
    rt: ModelRuntime, worker: BatchWorker, run: RunningBatch, max_items: int, on_batch_done: Any
) -> None:
    batch = run.requests
    now = time.perf_counter()
    inputs: dict[str, list[Any]] = {name: [] for name in batch[0].inputs}
    metrics = rt.metrics
    items = 0
    for req in batch:
        req.dispatched_at = now
        items += req.size
        for name, values in req.inputs.items():
            inputs[name].extend(values)
        if metrics is not None:
            metrics.queue_wait.observe(now - req.enqueued_at)
            if req.cold:
                metrics.cold_start_wait.observe(now - req.enqueued_at)
    if metrics is not None:
        metrics.batch_size.observe(items)
    params = dict(batch[0].params)
    params["batch_size"] = max_items
    rt.batches += 1
    bid = worker.new_batch_id()
    trace_ids = [req.trace_id for req in batch]
    try:
        error: ModelMoraError | None = None
        outputs: Outputs | None = None
        with run.scope:  # cancelled when every request of the batch was withdrawn
            try:
                outputs = await worker.infer(
                    inputs, params, batch_id=bid, on_event=_event_router(batch), trace_ids=trace_ids
                )
            except ModelMoraError as exc:
                error = exc
            except Exception as exc:  # a bug below us fails this batch, not the server
                log.error("batch_failed_unexpectedly", model=str(rt.key), trace_ids=trace_ids, exc_info=exc)
                error = ModelUnavailable(f"model {rt.key.model_id!r} failed while running this request")
        if run.scope.cancelled_caught:  # the handle told the worker to stop it at its next step
            log.info("batch_cancelled", model=str(rt.key), batch=bid, trace_ids=trace_ids)
        elif outputs is not None:
            on_batch_done(rt, worker)
            _deliver(batch, outputs)
            rt.crash_streak = 0
            rt.served += len(batch)
            rt.last_used = rt.queue.clock()
        elif error is not None:
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


def abandon_if_unwanted(rt: ModelRuntime, req: Request) -> None:
    """Cancel the running batch holding `req` when nobody waits for any of its requests any more."""
    for run in rt.running:
        if req in run.requests and all(r.cancelled for r in run.requests):
            run.scope.cancel()


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
