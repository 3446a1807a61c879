"""The workers' log lines have the supervisor's shape: JSON with timestamp, level and event, or
structlog's console layout; tagged with role, pid, model and version; filtered by level."""

from __future__ import annotations

import json
import os
import re

import pytest

from modelmora_workers import logline


@pytest.fixture(autouse=True)
def _fresh_context(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logline, "_context", {})


def test_json_lines(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MODELMORA_LOG_FORMAT", "json")
    monkeypatch.setenv("MODELMORA_LOG_LEVEL", "debug")
    logline.bind(model="echo", version="1.0.0")
    logline.write("worker", "batch_done", level="debug", trace_ids=["ab" * 16], items=3)
    event = json.loads(capsys.readouterr().err)
    assert event["event"] == "batch_done" and event["level"] == "debug"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$", event["timestamp"])
    assert event["role"] == "worker" and event["pid"] == os.getpid()
    assert (event["model"], event["version"], event["trace_ids"], event["items"]) == ("echo", "1.0.0", ["ab" * 16], 3)


def test_console_lines_and_levels(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MODELMORA_LOG_FORMAT", "console")
    monkeypatch.delenv("MODELMORA_LOG_LEVEL", raising=False)
    logline.bind(model="echo")
    logline.write("worker", "batch_done", level="debug", items=3)  # below the default level (info)
    logline.write("worker", "batch_failed", level="error", traceback="Traceback\n  line")
    (line,) = capsys.readouterr().err.splitlines()
    assert re.match(
        r"^\S+Z \[error    \] batch_failed\s+model=echo pid=\d+ role=worker traceback=\"Traceback\\n  line\"$", line
    )
    monkeypatch.setenv("MODELMORA_LOG_LEVEL", "warning")
    assert not logline.enabled("info") and logline.enabled("warning")
