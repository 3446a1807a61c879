"""The REST API over a real scheduler whose Echo workers are forked from a zygote (asyncio and trio).

The same paths as tests/api/test_rest_echo.py, through the production launcher; the zygote
preloads only numpy, so the tests stay fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import psutil
import pytest

from conftest import AppUnderTest

pytestmark = [pytest.mark.anyio, pytest.mark.zygote]


async def infer(app: AppUnderTest, body: object) -> tuple[int, dict]:
    r = await app.client.post("/api/v1/infer/echo", json=body)
    return r.status_code, r.json()


async def status(app: AppUnderTest) -> dict:
    return (await app.client.get("/api/v1/status")).json()


async def test_echo_through_the_zygote(echo_app: AppUnderTest) -> None:
    code, body = await infer(echo_app, {"input_data": {"text": ["abc", "de"]}})
    assert code == 200, body
    assert [row[0] for row in body["output"]["embeddings"]] == [3.0, 2.0]
    st = await status(echo_app)
    zygote, worker = st["zygote"], st["models"][0]["worker"]
    assert zygote["state"] == "ready" and zygote["preload"] == ["numpy"]
    assert zygote["pid"] not in (None, os.getpid()) and zygote["pss_mb"] > 0 and zygote["workers"] == 1
    assert worker["forked"] is True and psutil.Process(worker["pid"]).ppid() == zygote["pid"]
    assert worker["start_ms"]["total"] >= worker["start_ms"]["boot"] > 0


async def test_concurrent_requests(echo_app: AppUnderTest) -> None:
    results: dict[int, list[list[float]]] = {}

    async def one(i: int) -> None:
        code, body = await infer(echo_app, {"input_data": {"text": ["x" * (i + 1)] * (1 + i % 3)}})
        assert code == 200, body
        results[i] = body["output"]["embeddings"]

    async with anyio.create_task_group() as tg:
        for i in range(32):
            tg.start_soon(one, i)
    assert all(rows[0][0] == float(i + 1) and len(rows) == 1 + i % 3 for i, rows in results.items())


async def test_crash_then_a_fresh_fork(echo_app: AppUnderTest) -> None:
    assert (await infer(echo_app, {"input_data": {"text": "warm"}}))[0] == 200
    pid1 = (await status(echo_app))["models"][0]["worker"]["pid"]
    code, body = await infer(echo_app, {"input_data": {"text": "__crash__"}})
    assert code == 503 and body["error"]["code"] == "worker_crashed"
    assert (await infer(echo_app, {"input_data": {"text": "after"}}))[0] == 200
    st = await status(echo_app)
    model = st["models"][0]
    assert model["worker"]["pid"] != pid1 and model["worker"]["forked"] is True
    assert model["crashes"] == 1 and st["zygote"]["forks"] == 2


async def test_deadline_and_pipeline_error(echo_app: AppUnderTest) -> None:
    code, body = await infer(echo_app, {"input_data": {"text": "__sleep__1.5"}, "timeout_seconds": 0.3})
    assert code == 504 and body["error"]["code"] == "deadline_exceeded"
    code, body = await infer(echo_app, {"input_data": {"text": "__raise__"}})
    assert code == 500 and body["error"]["code"] == "inference_failed"
    assert (await infer(echo_app, {"input_data": {"text": "next"}}))[0] == 200


async def test_load_failure_then_recovery(echo_app: AppUnderTest) -> None:
    rec = echo_app.store.get("echo")
    assert rec is not None
    flag = Path(rec.versions[0].path) / "FAIL_LOAD"
    flag.touch()
    code, body = await infer(echo_app, {"input_data": {"text": "a"}})
    assert code == 503 and body["error"]["code"] == "model_load_failed"
    flag.unlink()
    await echo_app.client.post("/api/v1/models/echo/load")  # a failed model waits for an explicit load
    with anyio.fail_after(30):
        while (code := (await infer(echo_app, {"input_data": {"text": "a"}}))[0]) != 200:  # noqa: ASYNC110
            await anyio.sleep(0.1)


@pytest.mark.settings(request_ring_mb=1, response_ring_mb=1, max_body_bytes=16 * 2**20, max_text_chars=4 * 2**20)
async def test_payload_larger_than_the_ring(echo_app: AppUnderTest) -> None:
    big = "é" * (2**20)
    code, body = await infer(echo_app, {"input_data": {"text": [big, "small"]}})
    assert code == 200, body
    assert body["output"]["embeddings"][0][0] == float(len(big))


async def test_forked_workers_save_coverage(echo_app: AppUnderTest) -> None:
    """A forked worker ends with os._exit: it must save its coverage data first."""
    if "COVERAGE_PROCESS_CONFIG" not in os.environ:
        pytest.skip("coverage does not measure subprocesses in this run")
    assert (await infer(echo_app, {"input_data": {"text": "a"}}))[0] == 200
    pid = (await status(echo_app))["models"][0]["worker"]["pid"]
    await infer(echo_app, {"input_data": {"text": "__raise__"}})  # still alive afterwards
    os.kill(pid, 0)
    assert not list(Path.cwd().glob(f".coverage.*.pid{pid}.*"))
    echo_app.scheduler.close()  # stops the worker: Shutdown, exit through the zygote's exit path
    with anyio.fail_after(10):
        while not list(Path.cwd().glob(f".coverage.*.pid{pid}.*")):  # noqa: ASYNC110
            await anyio.sleep(0.05)
