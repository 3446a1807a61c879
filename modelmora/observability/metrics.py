"""Every Prometheus metric of the server, defined once, in a registry of the server's own.

Counters and histograms are recorded where things happen: the core (requests, by the protocol
name each front end passes), the scheduler (queue wait, batch sizes, cold starts, loads, unloads,
evictions) and the worker channel (inference time, as each worker measures it and reports it in
its `Result` message). Gauges (queue depth, models, memory, GPUs) are read from the scheduler when
Prometheus scrapes (`runtime.RuntimeCollector`): nothing is kept up to date between scrapes.

The request path stays cheap: each model's children are bound once (`ModelMetrics`, kept on the
model's runtime) and a successful request costs one counter increment and two histogram
observations through them, with no label lookup and no string building; the counters and
histograms are lock-free ones recorded on the event loop (`instruments`), exposed through
prometheus_client's registry. Failures, loads and other rare events look their labels up.

Label values: `model` is a model id the registry knows ("" for a request refused before its model
was found: an unknown id never becomes a label), `task` its task type, `protocol` the front end
("rest", "grpc", "openai", "oip-rest", "oip-grpc"), `outcome` "ok", "cancelled" or the error's code ("queue_full",
"deadline_exceeded", "invalid_input", ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder

from .instruments import CounterFamily, HistogramFamily

if TYPE_CHECKING:
    from .runtime import RuntimeSample

__all__ = (
    "CANCELLED",
    "CONTENT_TYPE",
    "Metrics",
    "ModelMetrics",
    "RequestMetrics",
)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""The media type of `Metrics.exposition()` without an Accept header: Prometheus text format 0.0.4."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

OK = "ok"
CANCELLED = "cancelled"
"""Outcome of a request whose caller cancelled it (a stream closed early, a cancelled RPC)."""

_CANCEL_REASONS = {"deadline_exceeded": "deadline", "client_closed_request": "disconnect", CANCELLED: "client"}
"""Outcome -> `modelmora_request_cancellations_total` reason."""
_REJECTIONS = {"queue_full": "queue_full", "insufficient_memory": "no_memory"}
"""Outcome -> `modelmora_request_rejections_total` reason."""


class RequestMetrics:
    """The children that count the successful requests of one model, task and protocol."""

    __slots__ = ("_count", "_duration")

    def __init__(self, metrics: Metrics, model: str, task: str, protocol: str) -> None:
        self._count = metrics.requests.labels(model, task, protocol, OK)
        self._duration = metrics.request_duration.labels(model, task, protocol, OK)

    def ok(self, seconds: float) -> None:
        """One request answered, `seconds` after it arrived."""
        self._count.inc()
        self._duration.observe(seconds)


class ModelMetrics:
    """One model's children, bound once (the scheduler keeps them on the model's runtime)."""

    __slots__ = (
        "_metrics",
        "_protocols",
        "batch_size",
        "cold_start_wait",
        "cold_starts",
        "inference",
        "model",
        "queue_wait",
        "task",
    )

    def __init__(self, metrics: Metrics, model: str, task: str) -> None:
        self._metrics = metrics
        self.model = model
        self.task = task
        self.queue_wait = metrics.queue_wait.labels(model)
        self.inference = metrics.inference.labels(model)
        self.batch_size = metrics.batch_size.labels(model)
        self.cold_starts = metrics.cold_starts.labels(model)
        self.cold_start_wait = metrics.cold_start_wait.labels(model)
        self._protocols: dict[str, RequestMetrics] = {}

    def protocol(self, name: str) -> RequestMetrics:
        """The success children of requests to this model that came in by protocol `name`."""
        bound = self._protocols.get(name)
        if bound is None:
            bound = self._protocols[name] = RequestMetrics(self._metrics, self.model, self.task, name)
        return bound


class Metrics:
    """The server's metrics and their registry (one per scheduler; the server has one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        req = ("model", "task", "protocol", "outcome")
        self.requests = CounterFamily(
            "modelmora_requests",
            "Inference requests, by how they ended: 'ok', 'cancelled' or the error code.",
            req,
            r,
        )
        self.request_duration = HistogramFamily(
            "modelmora_request_duration_seconds",
            "Time from a request's arrival in the core to its answer (validation, queue, inference, output).",
            req,
            r,
            buckets=LATENCY_BUCKETS,
        )
        self.queue_wait = HistogramFamily(
            "modelmora_queue_wait_seconds",
            "Time a request waited in its model's queue before its batch was dispatched.",
            ("model",),
            r,
            buckets=LATENCY_BUCKETS,
        )
        self.inference = HistogramFamily(
            "modelmora_inference_duration_seconds",
            "Time a worker spent on one batch, as the worker measured it (inputs read to outputs written).",
            ("model",),
            r,
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = HistogramFamily(
            "modelmora_batch_size_items",
            "Items (texts, images) per batch dispatched to a worker.",
            ("model",),
            r,
            buckets=BATCH_BUCKETS,
        )
        self.cold_starts = CounterFamily(
            "modelmora_cold_start_requests",
            "Requests that arrived while their model was not loaded (or its worker stopping) and waited for a load.",
            ("model",),
            r,
        )
        self.cold_start_wait = HistogramFamily(
            "modelmora_cold_start_wait_seconds",
            "Time cold-start requests waited before their batch was dispatched (mostly the load).",
            ("model",),
            r,
            buckets=LOAD_BUCKETS,
        )
        self.cancellations = CounterFamily(
            "modelmora_request_cancellations",
            "Requests given up before their answer: deadline passed, client disconnected, caller cancelled.",
            ("model", "reason"),
            r,
        )
        self.rejections = CounterFamily(
            "modelmora_request_rejections",
            "Requests refused for lack of room: queue full (429), no memory for the model within the deadline.",
            ("model", "reason"),
            r,
        )
        self.loads = CounterFamily(
            "modelmora_model_loads",
            "Worker starts (load and test inference) begun, by what asked for them: request, explicit, retry.",
            ("model", "reason"),
            r,
        )
        self.load_failures = CounterFamily(
            "modelmora_model_load_failures", "Loads or test inferences that failed.", ("model",), r
        )
        self.load_duration = HistogramFamily(
            "modelmora_model_load_duration_seconds",
            "Time from a load's start (after admission) to the model being ready (successful loads).",
            ("model",),
            r,
            buckets=LOAD_BUCKETS,
        )
        self.unloads = CounterFamily(
            "modelmora_model_unloads",
            "Workers that ended, by reason: evict, idle, unload, uninstall, replace, stalled, crashed.",
            ("model", "reason"),
            r,
        )
        self.evictions = CounterFamily(
            "modelmora_model_evictions",
            "Models evicted: to make room for another model's load, or because the budget was exceeded.",
            ("model", "reason"),
            r,
        )
        self.jobs = CounterFamily(
            "modelmora_jobs",
            "Async job events: submitted, completed, failed, retried (a transient failure), requeued"
            " (left running by a server that stopped, or whose lease expired), reclaimed (a dead server's"
            " Redis Streams entry taken over).",
            ("model", "event"),
            r,
        )
        self.job_callbacks = CounterFamily(
            "modelmora_job_callbacks",
            "Job callback deliveries, by outcome: delivered, retried, failed (attempts ran out).",
            ("outcome",),
            r,
        )
        self._models: dict[tuple[str, str], ModelMetrics] = {}

    def observe_runtime(self, sample: Callable[[], RuntimeSample]) -> None:
        """Report the gauges read from `sample()` at each scrape (queues, models, memory, GPUs) and
        the supervisor process's own figures."""
        from .runtime import RuntimeCollector

        self.registry.register(RuntimeCollector(sample))
        prometheus_client.ProcessCollector(registry=self.registry)

    def model(self, model: str, task: str) -> ModelMetrics:
        """The children of one model (made on first use, then shared by its versions)."""
        bound = self._models.get((model, task))
        if bound is None:
            bound = self._models[(model, task)] = ModelMetrics(self, model, task)
        return bound

    def request_failed(self, model: str, task: str, protocol: str, outcome: str, seconds: float) -> None:
        """A request ended without its answer: `outcome` is the error code, or `CANCELLED`."""
        self.requests.labels(model, task, protocol, outcome).inc()
        self.request_duration.labels(model, task, protocol, outcome).observe(seconds)
        reason = _CANCEL_REASONS.get(outcome)
        if reason is not None:
            self.cancellations.labels(model, reason).inc()
        reason = _REJECTIONS.get(outcome)
        if reason is not None:
            self.rejections.labels(model, reason).inc()

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """Every metric, and its media type: the format the scraper's `accept` header asks for
        (OpenMetrics, or a newer text format), else the Prometheus text format 0.0.4 (`CONTENT_TYPE`)."""
        encode, media_type = choose_encoder(accept)
        return encode(self.registry), media_type
