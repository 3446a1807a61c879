"""Span export (off unless `otlp_endpoint` is set): one SERVER span per request with the ids the
caller got back, exported through the OpenTelemetry SDK (in memory here)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from modelmora.config import load_settings
from modelmora.observability import ExportUnavailable, Spans, open_otlp
from modelmora.server import StartupError, _span_export

from conftest import AppUnderTest

pytestmark = pytest.mark.anyio


@pytest.fixture
def exported(echo_app: AppUnderTest) -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    echo_app.service.record.spans = Spans(memory, batch=False)
    yield memory
    echo_app.service.record.spans.close()


async def test_a_request_is_one_server_span_with_the_returned_ids(
    echo_app: AppUnderTest, exported: InMemorySpanExporter
) -> None:
    sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r = await echo_app.client.post(
        "/api/v1/infer/echo", json={"input_data": {"text": "a"}}, headers={"traceparent": sent}
    )
    assert r.status_code == 200
    _, trace_id, span_id, _ = r.headers["traceparent"].split("-")
    (span,) = exported.get_finished_spans()
    assert span.name == "infer echo" and span.kind == SpanKind.SERVER
    assert f"{span.context.trace_id:032x}" == trace_id and f"{span.context.span_id:016x}" == span_id
    assert span.parent is not None and f"{span.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert span.attributes["modelmora.outcome"] == "ok" and span.attributes["modelmora.protocol"] == "rest"
    assert span.attributes["modelmora.task"] == "txt2embed" and span.attributes["modelmora.version"] == "1.0.0"
    assert span.end_time > span.start_time and span.resource.attributes["service.name"] == "modelmora"


async def test_failures_are_error_spans_and_unsampled_traces_are_not_sent(
    echo_app: AppUnderTest, exported: InMemorySpanExporter
) -> None:
    r = await echo_app.client.post("/api/v1/infer/echo", json={"input_data": {"text": []}})
    assert r.status_code == 422
    (span,) = exported.get_finished_spans()
    assert span.parent is None  # the trace started here
    assert span.status.status_code == StatusCode.ERROR and span.status.description == "invalid_input"
    unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    r = await echo_app.client.post(
        "/api/v1/infer/echo", json={"input_data": {"text": "a"}}, headers={"traceparent": unsampled}
    )
    assert r.status_code == 200 and len(exported.get_finished_spans()) == 1


@pytest.mark.skipif(
    importlib.util.find_spec("opentelemetry.exporter") is not None, reason="the OTLP exporter is installed here"
)
def test_without_the_exporter_package_the_server_refuses_to_start_saying_what_to_install() -> None:
    with pytest.raises(ExportUnavailable, match="pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http"):
        open_otlp("http://127.0.0.1:4318/v1/traces")


@pytest.mark.skipif(
    importlib.util.find_spec("opentelemetry.exporter") is not None, reason="the OTLP exporter is installed here"
)
async def test_the_start_up_error() -> None:
    settings = load_settings(None, environ={}, otlp_endpoint="http://127.0.0.1:4318/v1/traces")
    with pytest.raises(StartupError, match="otlp_endpoint is set"):
        async with _span_export(settings.otlp_endpoint):
            pass
    async with _span_export("") as spans:
        assert spans is None
