"""Metrics (every Prometheus metric defined once), structured logs and W3C trace context."""

from .export import ExportUnavailable, Spans, open_otlp
from .gpu import GpuSample, Nvml
from .logs import configure_logging, debug_enabled, effective_format, worker_log_env
from .metrics import CANCELLED, CONTENT_TYPE, Metrics, ModelMetrics, RequestMetrics
from .runtime import ModelSample, RuntimeCollector, RuntimeSample
from .tracing import (
    TraceContext,
    add_trace_id,
    current_trace,
    detach,
    incoming,
    new_trace,
    reset_current,
    set_current,
)

__all__ = (
    "CANCELLED",
    "CONTENT_TYPE",
    "ExportUnavailable",
    "GpuSample",
    "Metrics",
    "ModelMetrics",
    "ModelSample",
    "Nvml",
    "RequestMetrics",
    "RuntimeCollector",
    "RuntimeSample",
    "Spans",
    "TraceContext",
    "add_trace_id",
    "configure_logging",
    "current_trace",
    "debug_enabled",
    "detach",
    "effective_format",
    "incoming",
    "new_trace",
    "open_otlp",
    "reset_current",
    "set_current",
    "worker_log_env",
)
