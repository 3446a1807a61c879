"""W3C trace context: parsing with OpenTelemetry's propagator, new traces, and the current trace
on every log event of a request."""

from __future__ import annotations

import re

import pytest
import structlog.testing

from modelmora.observability import add_trace_id, current_trace, detach, incoming, new_trace, reset_current, set_current

TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def test_a_valid_traceparent_continues_the_callers_trace_with_a_span_of_our_own() -> None:
    t = incoming("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", "congo=t61rcWkgMzE")
    assert t.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert t.parent_span_id == "00f067aa0ba902b7" and t.span_id != t.parent_span_id
    assert t.flags == 0  # not sampled by the caller: passed on as received
    assert t.traceparent == f"00-4bf92f3577b34da6a3ce929d0e0e4736-{t.span_id}-00"
    assert TRACEPARENT.match(t.traceparent)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "garbage",
    ],
)
def test_a_missing_or_invalid_traceparent_starts_a_new_trace(header: str | None) -> None:
    t = incoming(header)
    assert t.parent_span_id == "" and t.flags == 1
    assert TRACEPARENT.match(t.traceparent) and int(t.trace_id, 16) and int(t.span_id, 16)
    assert header is None or t.trace_id not in header


def test_new_traces_differ() -> None:
    assert len({new_trace().trace_id for _ in range(100)}) == 100


def test_the_current_trace_tags_every_log_event_until_reset() -> None:
    t = new_trace()
    assert current_trace() is None
    with structlog.testing.capture_logs(processors=[add_trace_id]) as logs:
        log = structlog.get_logger("test")
        token = set_current(t)
        log.info("inside")
        log.info("explicit", trace_id="given")  # a field set by the caller wins
        reset_current(token)
        log.info("outside")
    assert [e.get("trace_id") for e in logs] == [t.trace_id, "given", None]


def test_detach_forgets_the_trace_in_this_context() -> None:
    token = set_current(new_trace())
    detach()
    assert current_trace() is None
    reset_current(token)
