"""A model that fails to load in its worker is one error event in the log, carrying its traceback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import AppUnderTest

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["json", "text"])
def log_format(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The workers' log format (their environment is taken when echo_app starts: list this fixture first)."""
    monkeypatch.setenv("MODELMORA_LOG_FORMAT", str(request.param))
    yield str(request.param)


async def _fail_a_load(app: AppUnderTest) -> None:
    rec = app.store.get("echo")
    assert rec is not None
    (Path(rec.versions[0].path) / "FAIL_LOAD").touch()
    r: httpx.Response = await app.client.post("/api/v1/infer/echo", json={"input_data": {"text": "a"}})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed"


@pytest.mark.settings(load_retry_attempts=1)
async def test_a_load_failure_is_one_error_line_with_the_traceback(
    log_format: str, echo_app: AppUnderTest, capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    await _fail_a_load(echo_app)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "load_failed" in line]
    assert len(lines) == 1, err
    assert not any(line.startswith(("Traceback", "  File ", "RuntimeError")) for line in err.splitlines()), err
    if log_format == "json":
        event = json.loads(lines[0])
        assert event["event"] == "load_failed" and event["level"] == "error" and event["role"] == "worker"
        assert event["model"] == "echo"
        assert event["error"] == "RuntimeError: load failure requested by the test"
        assert event["traceback"].startswith("Traceback (most recent call last):")
        assert event["traceback"].endswith("RuntimeError: load failure requested by the test")
        assert event["traceback"].count("Traceback") == 1
    else:
        assert "error=RuntimeError: load failure requested by the test" in lines[0]
        assert 'traceback="Traceback (most recent call last):\\n' in lines[0]
