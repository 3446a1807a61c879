"""What the core records about each request it answers: its metrics (by the protocol its front
end passed, and its outcome), one log line, and a warning when it was slow.

Successes are logged at debug level only (their fields are not even built otherwise) and cost
three operations on children bound once per model; every failure is logged: expected ones
(4xx, a client gone, a caller's cancellation) at info, unavailability and deadlines (503, 504)
as warnings, a failed inference (500) as an error, a bug as an error with its traceback. Lines
logged while the request is served carry its `trace_id` (`observability.tracing`).
"""

from __future__ import annotations

import structlog

from ..errors import ModelMoraError
from ..observability import CANCELLED, Metrics, ModelMetrics, Spans, TraceContext, debug_enabled
from .outputs import Timing

__all__ = ("RequestRecorder",)

log = structlog.get_logger("modelmora.service")


class RequestRecorder:
    """Records requests into `metrics` and the log.

    Args:
        metrics: the server's metrics.
        slow_fraction: a request that used more than this share of its timeout is logged as slow
            (0: never).
    """

    def __init__(self, metrics: Metrics, slow_fraction: float) -> None:
        self.metrics = metrics
        self.slow_fraction = slow_fraction
        self.spans: Spans | None = None
        """Where request spans are exported (`otlp_endpoint`); None: nowhere."""

    def ok(
        self,
        model: ModelMetrics | None,
        protocol: str,
        version: str,
        timing: Timing,
        seconds: float,
        timeout_s: float,
        trace: TraceContext | None = None,
    ) -> None:
        """A request was answered `seconds` after it arrived."""
        if model is not None:
            model.protocol(protocol).ok(seconds)
        if self.spans is not None and trace is not None:
            name = model.model if model is not None else ""
            attributes = {
                "modelmora.model": name,
                "modelmora.version": version,
                "modelmora.task": model.task if model is not None else "",
                "modelmora.protocol": protocol,
                "modelmora.outcome": "ok",
                "modelmora.queue_ms": timing.queue_ms,
                "modelmora.inference_ms": timing.inference_ms,
            }
            self.spans.request(trace, f"infer {name}", seconds, attributes)
        if self.slow_fraction and seconds > self.slow_fraction * timeout_s:
            log.warning(
                "slow_request",
                model=model.model if model is not None else None,
                version=version,
                protocol=protocol,
                total_ms=timing.total_ms,
                queue_ms=timing.queue_ms,
                inference_ms=timing.inference_ms,
                timeout_s=timeout_s,
            )
        elif debug_enabled():
            log.debug(
                "request_completed",
                model=model.model if model is not None else None,
                version=version,
                protocol=protocol,
                outcome="ok",
                total_ms=timing.total_ms,
                queue_ms=timing.queue_ms,
                inference_ms=timing.inference_ms,
            )

    def failed(
        self,
        model: str,
        task: str,
        protocol: str,
        error: BaseException | None,
        seconds: float,
        trace: TraceContext | None = None,
    ) -> None:
        """A request ended without an answer: an expected error, a bug, or its caller's cancellation
        (`error` is then the cancellation exception, or None).

        `model` is "" when the request was refused before its model was found.
        """
        if isinstance(error, ModelMoraError):
            outcome = error.code
        elif isinstance(error, Exception):
            outcome = "internal_error"
        else:
            outcome = CANCELLED
        self.metrics.request_failed(model, task, protocol, outcome, seconds)
        if self.spans is not None and trace is not None:
            attributes = {"modelmora.model": model, "modelmora.task": task, "modelmora.protocol": protocol}
            attributes["modelmora.outcome"] = outcome
            self.spans.request(trace, f"infer {model}", seconds, attributes, error=outcome)
        fields = {"model": model or None, "protocol": protocol, "outcome": outcome, "total_ms": round(seconds * 1e3, 3)}
        if isinstance(error, ModelMoraError):
            status = error.http_status
            level = log.error if status == 500 else log.warning if status > 500 else log.info
            level("request_failed", status=error.http_status, message=error.message, **fields)
        elif isinstance(error, Exception):
            log.error("request_failed", status=500, exc_info=error, **fields)
        else:
            log.info("request_cancelled", **fields)
