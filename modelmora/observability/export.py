"""Optional span export: one SERVER span per request, sent over OTLP when `otlp_endpoint` is set.

Off by default and nothing is imported then: the OpenTelemetry SDK and its OTLP exporter are not
dependencies of the server (`pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http`
where spans are wanted). A span is built once its request is answered, with the ids the request
already carries (`TraceContext`: the trace, this server's span id that the caller got back in
`traceparent`, the caller's span as parent) and handed to the SDK's batch processor, which exports
from a thread of its own; `close()` flushes and stops it. Only sampled traces (flag 01) are sent.
"""

from __future__ import annotations

import time
from typing import Any

from .tracing import TraceContext

__all__ = ("ExportUnavailable", "Spans", "open_otlp")


class ExportUnavailable(Exception):
    """`otlp_endpoint` is set but the OpenTelemetry SDK or its OTLP exporter is not installed."""


class Spans:
    """Hands finished request spans to an OpenTelemetry SDK span exporter.

    Args:
        exporter: an `opentelemetry.sdk.trace.export.SpanExporter` (OTLP, or in memory in tests).
        batch: export from the SDK's batch thread (False: at once, on the caller's thread).
        service_name: the `service.name` resource attribute.
    """

    def __init__(self, exporter: Any, *, batch: bool = True, service_name: str = "modelmora") -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self._processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        self._resource = Resource.create({"service.name": service_name})
        self._scope = InstrumentationScope("modelmora")

    def request(
        self, trace: TraceContext, name: str, seconds: float, attributes: dict[str, Any], error: str | None = None
    ) -> None:
        """A request that ended now, `seconds` after it began (`error`: why it failed)."""
        if not trace.flags & 1:
            return
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
        from opentelemetry.trace.status import Status, StatusCode

        end = time.time_ns()
        flags = TraceFlags(trace.flags)
        trace_id = int(trace.trace_id, 16)
        parent = (
            SpanContext(trace_id, int(trace.parent_span_id, 16), is_remote=True, trace_flags=flags)
            if trace.parent_span_id
            else None
        )
        span = ReadableSpan(
            name,
            context=SpanContext(trace_id, int(trace.span_id, 16), is_remote=False, trace_flags=flags),
            parent=parent,
            resource=self._resource,
            attributes=attributes,
            kind=SpanKind.SERVER,
            status=Status(StatusCode.ERROR, error) if error is not None else Status(StatusCode.UNSET),
            start_time=end - int(seconds * 1e9),
            end_time=end,
            instrumentation_scope=self._scope,
        )
        self._processor.on_end(span)

    def close(self) -> None:
        """Export what is pending and stop (blocks up to the exporter's timeout: call it off the loop)."""
        self._processor.shutdown()


def open_otlp(endpoint: str) -> Spans:
    """Spans exported over OTLP/HTTP (protobuf) to `endpoint` (e.g. "http://collector:4318/v1/traces").

    Raises:
        ExportUnavailable: the SDK or the exporter is not installed.
    """
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ExportUnavailable(
            "otlp_endpoint is set but the OpenTelemetry OTLP exporter is not installed: "
            "pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http (or unset otlp_endpoint)"
        ) from None
    return Spans(OTLPSpanExporter(endpoint=endpoint))
