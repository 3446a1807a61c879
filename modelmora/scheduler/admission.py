"""Memory admission and eviction: who may start a worker, and who makes room.

Before a worker starts, its estimated footprint is reserved in the `MemoryBudget` (and in
the VRAM budget when it runs on a GPU), evicting least-recently-used idle, unpinned models
first. A victim finishes its running batch, then its worker is stopped and reaped before
the reservation is made. When nothing can be evicted the load waits for capacity (a worker
stopping, a reservation released) or until nobody waits for it any more.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import anyio
import anyio.to_thread
import msgspec
import structlog

from ..broadcast import Broadcast
from ..config import Settings
from ..errors import InsufficientMemory
from ..lifecycle import ModelState
from ..lifecycle.budget import MemoryBudget, pss_bytes
from ..observability import Metrics
from .request import ModelKey
from .runtime import ModelRuntime, StopReason

__all__ = ("Admission", "BudgetStatus")

log = structlog.get_logger("modelmora.scheduler")
_MB = 2**20


class BudgetStatus(msgspec.Struct):
    """The worker memory budget (PSS, MiB) and the GPU memory budget; None where unlimited."""

    memory_budget_mb: float | None
    used_mb: float
    free_mb: float | None
    shared_mb: float
    """The zygote's PSS (its pages are shared by the workers forked from it)."""
    worker_base_mb: float
    vram_budget_mb: float | None
    vram_used_mb: float
    vram_free_mb: float | None


def _read_pss(pids: list[int], shared: Callable[[], int | None] | None) -> tuple[list[int | None], int | None]:
    """PSS of each pid, and of the shared processes (the zygote) when `shared` is given."""
    return [pss_bytes(pid) for pid in pids], (shared() if shared is not None else None)


class Admission:
    """The memory budgets and the decisions made against them."""

    def __init__(
        self, settings: Settings, models: Mapping[ModelKey, ModelRuntime], metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.models = models
        self.metrics = metrics or Metrics()
        self.budget = MemoryBudget(
            settings.effective_memory_budget_mb, settings.admission_factor, settings.worker_base_mb or 400.0
        )
        self.vram = MemoryBudget(max(0.0, settings.vram_budget_mb), settings.admission_factor, 0.0)
        """GPU memory of the workers (torch's reserved pools, as they report them); 0: not limited."""
        self._learn_base = settings.worker_base_mb <= 0
        self.capacity = Broadcast()
        """Notified when room may have appeared: a worker stopped, a model changed state (it may have
        become evictable), a waiting load lost its callers (every runtime's `any_changed`)."""
        self.monitor_errors = 0

    # -- estimates ------------------------------------------------------------------------

    def need_mb(self, rt: ModelRuntime) -> float:
        if rt.measured_mb is not None:  # measured on an earlier load of this version (+10% for load peaks)
            return rt.measured_mb * 1.1
        if rt.hint_mb is not None:  # the registry's resource hint
            return rt.hint_mb
        return self.budget.estimate_mb(rt.weights_bytes)

    def need_vram_mb(self, rt: ModelRuntime) -> float:
        """GPU memory to reserve before starting `rt`'s worker (0 when VRAM is not limited or it runs on CPU)."""
        if self.vram.unlimited:
            return 0.0
        on_gpu = rt.device.startswith("cuda") if rt.device is not None else rt.identity.device != "cpu"
        if not on_gpu:
            return 0.0
        if rt.measured_vram_mb is not None:
            return rt.measured_vram_mb * 1.1
        if rt.hint_vram_mb is not None:
            return rt.hint_vram_mb
        return self.vram.estimate_mb(rt.weights_bytes)

    def no_memory_message(self, rt: ModelRuntime) -> str:
        v = self.vram
        need_vram = self.need_vram_mb(rt)
        if need_vram and not v.fits(need_vram):
            return (
                f"insufficient GPU memory to load model {rt.key.model_id!r}: it needs ~{need_vram:.0f} MiB,"
                f" {v.free_mb():.0f} of {v.budget_mb:.0f} MiB (vram_budget_mb) are free and no loaded GPU model"
                " can be evicted (all busy or pinned)"
            )
        b = self.budget
        return (
            f"insufficient memory to load model {rt.key.model_id!r}: it needs ~{self.need_mb(rt):.0f} MiB,"
            f" {b.free_mb():.0f} of {b.budget_mb:.0f} MiB are free and no loaded model can be evicted"
            " (all busy or pinned)"
        )

    # -- admission --------------------------------------------------------------------------

    def victim(self, exclude: ModelRuntime | None, *, gpu: bool = False) -> ModelRuntime | None:
        """The least recently used loaded model that may be evicted, idle ones first (`gpu`: holding VRAM)."""
        candidates = [
            rt
            for rt in self.models.values()
            if rt is not exclude
            and rt.loaded
            and not rt.pinned
            and rt.stop_reason is None
            and (not gpu or self.vram.reserved_mb(rt))
        ]
        if not candidates:
            return None
        return min(candidates, key=lambda rt: (rt.busy, rt.last_used))

    async def admit(self, rt: ModelRuntime) -> None:
        """Reserve memory for `rt`'s worker, evicting LRU models or waiting for room.

        Raises:
            InsufficientMemory: it can never fit, or nobody waits for it any more.
        """
        need = self.need_mb(rt)
        need_vram = self.need_vram_mb(rt)
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
                    raise InsufficientMemory(self.no_memory_message(rt))  # nobody waits any more
                victim = self.victim(rt, gpu=budget.fits(need))
                if victim is not None:
                    log.info("evicting", model=str(victim.key), for_model=str(rt.key), need_mb=round(need))
                    victim.evictions += 1
                    self.metrics.evictions.labels(victim.key.model_id, "make_room").inc()
                    victim.stop(StopReason.EVICT)
                    while victim.loaded or victim.state == ModelState.UNLOADING:
                        await victim.changed.wait()
                    continue
                if not rt.waiting_for_memory:
                    rt.waiting_for_memory = True
                    rt.poke()
                await self.capacity.wait()  # a worker stopped, a model changed, or a waiting request left
            budget.reserve(rt, need)
            if need_vram:
                vram.reserve(rt, need_vram)
        finally:
            if rt.waiting_for_memory:
                rt.waiting_for_memory = False
                rt.poke()

    def release(self, rt: ModelRuntime) -> None:
        """`rt`'s worker is gone: give its reservations back and wake the loads waiting for room."""
        self.budget.release(rt)
        self.vram.release(rt)
        self.capacity.notify()

    # -- measurements -----------------------------------------------------------------------

    def record(self, rt: ModelRuntime, pss: int) -> None:
        rt.measured_mb = pss / _MB
        self.budget.measure(rt, rt.measured_mb)
        if self._learn_base:
            self.budget.learn_base(rt.measured_mb, rt.weights_bytes)

    def record_vram(self, rt: ModelRuntime, vram_bytes: int) -> None:
        """Replace the VRAM estimate by what the worker reports (none is held on the CPU)."""
        if rt.device is not None and not rt.device.startswith("cuda"):
            self.vram.release(rt)
            return
        rt.measured_vram_mb = vram_bytes / _MB
        self.vram.measure(rt, rt.measured_vram_mb)

    async def measure(self, rt: ModelRuntime, pid: int) -> None:
        # reading smaps_rollup walks every mapping (~16 ms for a 900 MB worker): off the event loop
        pss = await anyio.to_thread.run_sync(pss_bytes, pid)
        if pss is not None:
            self.record(rt, pss)

    async def monitor(self, shared: Callable[[], int | None] | None) -> None:
        """Refresh measured PSS; if a budget is exceeded, evict LRU idle models at once.

        One failed round (e.g. out of file descriptors) is logged and counted; the next round
        runs as usual. The /proc reads run in a worker thread: they cost milliseconds per large
        process and would otherwise stall every request on the event loop.
        """
        interval = self.settings.memory_poll_ms / 1000
        while True:
            await anyio.sleep(interval)
            try:
                await self._monitor_once(shared)
            except Exception as exc:
                self.monitor_errors += 1
                log.error("memory_monitor_failed", errors=self.monitor_errors, exc_info=exc)

    async def _monitor_once(self, shared: Callable[[], int | None] | None) -> None:
        live = [(rt, rt.worker.pid) for rt in self.models.values() if rt.worker is not None and rt.loaded]
        values, shared_bytes = await anyio.to_thread.run_sync(_read_pss, [pid for _, pid in live], shared)
        for (rt, pid), pss in zip(live, values, strict=True):
            if pss is not None and rt.worker is not None and rt.worker.pid == pid and rt.state == ModelState.READY:
                self.record(rt, pss)
        if shared is not None:
            self.budget.shared_mb = (shared_bytes or 0) / _MB
        for budget, gpu in ((self.budget, False), (self.vram, True)):
            if budget.unlimited or budget.used_mb() <= budget.budget_mb:
                continue
            victim = self.victim(exclude=None, gpu=gpu)
            if victim is not None and not victim.busy:
                log.warning("over_budget_evicting", model=str(victim.key), used_mb=round(budget.used_mb()), vram=gpu)
                victim.evictions += 1
                self.metrics.evictions.labels(victim.key.model_id, "over_budget").inc()
                victim.stop(StopReason.EVICT)

    def status(self) -> BudgetStatus:
        b, v = self.budget, self.vram
        return BudgetStatus(
            memory_budget_mb=None if b.unlimited else round(b.budget_mb, 1),
            used_mb=round(b.used_mb(), 1),
            free_mb=None if b.unlimited else round(b.free_mb(), 1),
            shared_mb=round(b.shared_mb, 1),
            worker_base_mb=round(b.base_mb, 1),
            vram_budget_mb=None if v.unlimited else round(v.budget_mb, 1),
            vram_used_mb=round(v.used_mb(), 1),
            vram_free_mb=None if v.unlimited else round(v.free_mb(), 1),
        )
