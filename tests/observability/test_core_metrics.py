"""What the protocol-neutral core records, whatever front end calls it: a caller's cancellation, a
stream answered or given up, a model that cannot fit in memory, a failed load, a saturated queue.
Real scheduler and worker processes (Echo and Shout pipelines) in process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest
import structlog.testing

from modelmora.errors import InsufficientMemory, ModelLoadFailed
from modelmora.ipc import segments
from modelmora.registry import SQLiteStore, install
from modelmora.scheduler import Scheduler
from modelmora.service import InferCall, InferResult

from conftest import BOTH_BACKENDS, AppUnderTest, make_settings, running_app, worker_env

pytestmark = pytest.mark.anyio

PIPELINES = {"txt2embed": "worker_pipelines:Echo", "txt2txt": "worker_pipelines:Shout"}


@pytest.fixture
def anyio_backend() -> str:
    """Real worker processes: asyncio, except the tests marked BOTH_BACKENDS."""
    return "asyncio"


@pytest.fixture
async def app(tmp_path: Path, echo_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[AppUnderTest]:
    marker = request.node.get_closest_marker("settings")
    home = tmp_path / "home"
    settings = make_settings(home, **(marker.kwargs if marker else {}))
    store = SQLiteStore(home / "registry.sqlite3")
    install(store, home, str(echo_dir), model_id="echo", task="txt2embed")
    install(store, home, str(echo_dir), model_id="shout", task="txt2txt")
    scheduler = Scheduler(settings, segments.new_instance_id(), pipelines=PIPELINES, worker_env=worker_env())
    async with running_app(settings, store, scheduler) as running:
        yield running


def sample(app: AppUnderTest, name: str, **labels: str) -> float:
    return app.service.metrics.registry.get_sample_value(name, labels) or 0.0


async def until(check: Callable[[], object], what: str) -> None:
    """Poll the in-process state (the limit is a safety net for a hung test, not a time bound)."""
    for _ in range(6000):
        if check():
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


@BOTH_BACKENDS
async def test_a_caller_that_cancels_is_counted_under_its_protocol(app: AppUnderTest) -> None:
    call = InferCall("echo", {"text": ["__sleep__0.5"]}, protocol="test")
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.service.infer, call)
            await until(lambda: any(rt.running for rt in app.scheduler.models.values()), "the batch runs")
            scope.cancel()
    task = {"model": "echo", "task": "txt2embed", "protocol": "test"}
    assert sample(app, "modelmora_requests_total", outcome="cancelled", **task) == 1
    assert sample(app, "modelmora_request_cancellations_total", model="echo", reason="client") == 1
    assert sample(app, "modelmora_requests_total", outcome="ok", **task) == 0


@BOTH_BACKENDS
async def test_streams_are_counted_when_answered_and_when_given_up(app: AppUnderTest) -> None:
    labels = {"model": "shout", "task": "txt2txt", "protocol": "test"}
    stream = await app.service.open_stream(InferCall("shout", {"text": "hi"}, stream=True, protocol="test"))
    items = [item async for item in stream]
    await stream.aclose()  # what every front end does when it is done (nothing is counted twice)
    assert isinstance(items[-1], InferResult)
    assert sample(app, "modelmora_requests_total", outcome="ok", **labels) == 1
    # a caller that stops listening after the first token
    stream = await app.service.open_stream(
        InferCall("shout", {"text": "__slow__0.05 abc"}, stream=True, protocol="test")
    )
    first = await stream.__anext__()
    assert not isinstance(first, InferResult) and first.kind == "token"
    await stream.aclose()
    assert sample(app, "modelmora_requests_total", outcome="cancelled", **labels) == 1
    assert sample(app, "modelmora_request_cancellations_total", model="shout", reason="client") == 1
    assert sample(app, "modelmora_requests_total", outcome="ok", **labels) == 1  # not counted twice


@pytest.mark.settings(memory_budget_mb=10, worker_base_mb=100)
async def test_a_model_that_cannot_fit_is_a_no_memory_rejection(app: AppUnderTest) -> None:
    with pytest.raises(InsufficientMemory):
        await app.service.infer(InferCall("echo", {"text": "x"}, protocol="test"))
    assert sample(app, "modelmora_request_rejections_total", model="echo", reason="no_memory") == 1
    labels = {"model": "echo", "task": "txt2embed", "protocol": "test", "outcome": "insufficient_memory"}
    assert sample(app, "modelmora_requests_total", **labels) == 1
    assert sample(app, "modelmora_model_loads_total", model="echo", reason="request") == 0  # it never started


@pytest.mark.settings(load_retry_attempts=1)
async def test_a_failed_load_is_counted(app: AppUnderTest) -> None:
    rec = app.store.get("echo")
    assert rec is not None
    (Path(rec.versions[0].path) / "FAIL_LOAD").touch()
    with pytest.raises(ModelLoadFailed):
        await app.service.infer(InferCall("echo", {"text": "x"}, protocol="test"))
    assert sample(app, "modelmora_model_loads_total", model="echo", reason="request") == 1
    assert sample(app, "modelmora_model_load_failures_total", model="echo") == 1
    assert sample(app, "modelmora_model_load_duration_seconds_count", model="echo") == 0
    (Path(rec.versions[0].path) / "FAIL_LOAD").unlink()
    await app.service.load("echo")  # an explicit load after the attempts ran out
    assert sample(app, "modelmora_model_loads_total", model="echo", reason="explicit") == 1
    assert sample(app, "modelmora_model_load_duration_seconds_count", model="echo") == 1
    await app.service.unload("echo")
    assert sample(app, "modelmora_model_unloads_total", model="echo", reason="unload") == 1


async def test_a_saturated_queue_is_one_warning(app: AppUnderTest) -> None:
    await app.client.put("/api/v1/models/echo", json={"queue_limit": 5})
    assert (await app.client.post("/api/v1/infer/echo", json={"input_data": {"text": "warm"}})).status_code == 200
    rt = next(iter(app.scheduler.models.values()))
    with structlog.testing.capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.service.infer, InferCall("echo", {"text": ["__sleep__0.5"]}))
            await until(lambda: rt.running, "the sleeping batch runs")
            for i in range(4):  # 4 of 5 waiting: saturated (once), then drained by the next batch
                tg.start_soon(app.service.infer, InferCall("echo", {"text": [f"queued {i}"]}))
            await until(lambda: len(rt.queue) == 4, "four requests wait")
            assert rt.queue.saturated
    assert not rt.queue.saturated
    warnings = [e for e in logs if e["event"] == "queue_saturated"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert warnings[0]["waiting"] == 4 and warnings[0]["limit"] == 5 and warnings[0]["model"] == "echo@1.0.0"
    depth = {p: sample(app, "modelmora_queue_depth", model="echo", version="1.0.0", priority=p) for p in ("normal",)}
    assert depth == {"normal": 0}
