"""The gauges read at scrape time: queues, models, workers' memory, the budgets, GPUs.

The scheduler describes its state as a `RuntimeSample` (plain values, no scheduler types here)
each time Prometheus scrapes; `RuntimeCollector` turns it into metric families. Nothing on the
request path keeps these gauges up to date.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .gpu import GpuSample, Nvml

__all__ = ("ModelSample", "RuntimeCollector", "RuntimeSample")


@dataclass(frozen=True, slots=True)
class ModelSample:
    """One model version at run time."""

    model: str
    version: str
    task: str
    state: str
    queued: Mapping[str, int]
    """Requests waiting, by priority name ("critical", "high", "normal", "low")."""
    running_batches: int = 0
    worker_pid: int | None = None
    pss_bytes: int | None = None
    """The worker's proportional set size, as last measured."""
    device: str | None = None
    vram_bytes: int | None = None
    """GPU memory the worker holds, as it last reported (None on the CPU)."""


@dataclass(frozen=True, slots=True)
class RuntimeSample:
    models: list[ModelSample]
    memory_budget_bytes: float | None
    """None: unlimited."""
    memory_used_bytes: float
    """Reserved or measured for the workers, plus the zygote."""
    zygote_pss_bytes: float
    vram_budget_bytes: float | None
    vram_used_bytes: float


class RuntimeCollector(Collector):
    """Reads `sample()` at each scrape (and the GPUs through NVML, where there are any)."""

    def __init__(self, sample: Callable[[], RuntimeSample], nvml: Nvml | None = None) -> None:
        self._sample = sample
        self._nvml = nvml or Nvml()

    def describe(self) -> list[Metric]:
        return []  # described at each scrape: nothing is read at registration

    def collect(self) -> Iterator[Metric]:
        s = self._sample()
        yield from _models(s.models)
        yield from _memory(s)
        yield from _gpus(self._nvml.samples())


def _models(models: list[ModelSample]) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "modelmora_queue_depth",
        "Requests waiting in a model's queue, by priority.",
        labels=("model", "version", "priority"),
    )
    running = GaugeMetricFamily(
        "modelmora_running_batches", "Batches running in a model's worker.", labels=("model", "version")
    )
    state = GaugeMetricFamily(
        "modelmora_model_state",
        "1 for the state each model version is in (cached, loading, warming, ready, unloading, failed).",
        labels=("model", "version", "task", "state"),
    )
    pss = GaugeMetricFamily(
        "modelmora_worker_pss_bytes",
        "Proportional set size of each worker process (what the memory budget counts).",
        labels=("model", "version", "pid"),
    )
    resident = GaugeMetricFamily(
        "modelmora_model_resident_bytes",
        "Memory a loaded model holds per device: its worker's PSS on 'cpu', its GPU memory on 'cuda:N'.",
        labels=("model", "version", "device"),
    )
    active = 0
    for m in models:
        for priority, n in m.queued.items():
            depth.add_metric((m.model, m.version, priority), n)
        running.add_metric((m.model, m.version), m.running_batches)
        state.add_metric((m.model, m.version, m.task, m.state), 1)
        if m.worker_pid is None:
            continue
        active += 1
        if m.pss_bytes is not None:
            pss.add_metric((m.model, m.version, str(m.worker_pid)), m.pss_bytes)
            resident.add_metric((m.model, m.version, "cpu"), m.pss_bytes)
        if m.vram_bytes is not None and m.device is not None and m.device.startswith("cuda"):
            resident.add_metric((m.model, m.version, m.device), m.vram_bytes)
    yield depth
    yield running
    yield state
    yield GaugeMetricFamily("modelmora_active_models", "Model versions with a running worker.", value=active)
    yield pss
    yield resident


def _memory(s: RuntimeSample) -> Iterator[Metric]:
    if s.memory_budget_bytes is not None:
        yield GaugeMetricFamily(
            "modelmora_memory_budget_bytes",
            "The workers' memory budget (PSS of workers and zygote); absent when unlimited.",
            value=s.memory_budget_bytes,
        )
    yield GaugeMetricFamily(
        "modelmora_memory_used_bytes",
        "Memory counted against the budget: workers (measured, or reserved while loading) and the zygote.",
        value=s.memory_used_bytes,
    )
    yield GaugeMetricFamily(
        "modelmora_zygote_pss_bytes", "Proportional set size of the zygote (0 without one).", value=s.zygote_pss_bytes
    )
    if s.vram_budget_bytes is not None:
        yield GaugeMetricFamily(
            "modelmora_vram_budget_bytes",
            "The GPU memory budget of the workers; absent when unlimited.",
            value=s.vram_budget_bytes,
        )
    yield GaugeMetricFamily(
        "modelmora_vram_used_bytes",
        "GPU memory the workers hold or reserved, as counted against the budget.",
        value=s.vram_used_bytes,
    )


def _gpus(gpus: list[GpuSample]) -> Iterator[Metric]:
    if not gpus:
        return
    util = GaugeMetricFamily(
        "modelmora_gpu_utilization_ratio", "Share of time a kernel ran on each GPU (NVML, 0..1).", labels=("gpu",)
    )
    used = GaugeMetricFamily("modelmora_gpu_memory_used_bytes", "Memory used on each GPU (NVML).", labels=("gpu",))
    total = GaugeMetricFamily("modelmora_gpu_memory_total_bytes", "Memory of each GPU (NVML).", labels=("gpu",))
    for g in gpus:
        util.add_metric((str(g.index),), g.utilization_ratio)
        used.add_metric((str(g.index),), g.memory_used_bytes)
        total.add_metric((str(g.index),), g.memory_total_bytes)
    yield util
    yield used
    yield total
