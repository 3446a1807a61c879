"""No room in /dev/shm never takes the server down (real workers, Echo pipeline, asyncio and
trio): a request whose payload cannot get a segment gets 503 `shared_memory_exhausted` while the
worker keeps serving, and a worker whose rings cannot be made fails its load (503
`model_load_failed`) and loads once there is room. The room is simulated here by replacing
`segments.shm_room`; tests/e2e/test_small_shm.py runs a real server with a small /dev/shm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from modelmora.errors import SharedMemoryFull
from modelmora.ipc import segments
from modelmora.lifecycle import TensorData, WorkerHandle, WorkerSpec

from conftest import AppUnderTest, worker_env

pytestmark = pytest.mark.anyio

MiB = 1 << 20


def no_room(monkeypatch: pytest.MonkeyPatch, free: int = 0) -> None:
    monkeypatch.setattr(segments, "shm_room", lambda: segments.ShmRoom(total=64 * MiB, free=free))


LARGE = ["x" * 90_000] * 24
"""2.1 MB of text in one request (each text under `max_text_chars`): more than a 1 MiB ring."""


async def infer(app: AppUnderTest, text: str | list[str]) -> tuple[int, Any, str | None]:
    r = await app.client.post("/api/v1/infer/echo", json={"input_data": {"text": text}})
    return r.status_code, r.json(), r.headers.get("retry-after")


async def status(app: AppUnderTest) -> Any:
    models = (await app.client.get("/api/v1/status")).json()["models"]
    return {m["model_id"]: m for m in models}["echo"]


@pytest.mark.settings(request_ring_mb=1, response_ring_mb=1)
async def test_a_payload_without_room_gets_503_and_the_worker_keeps_serving(
    echo_app: AppUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, body, _ = await infer(echo_app, "warm")
    assert code == 200, body
    pid = (await status(echo_app))["worker"]["pid"]

    no_room(monkeypatch, free=MiB)  # 1 MiB free: the 2.1 MB payload needs a segment of its own
    code, body, retry_after = await infer(echo_app, LARGE)
    assert code == 503, body
    assert body["error"]["code"] == "shared_memory_exhausted"
    assert retry_after == "1"

    code, body, _ = await infer(echo_app, "small")  # the ring still serves small payloads
    assert code == 200, body
    assert body["output"]["embeddings"] == [[5.0, float(sum(map(ord, "small"))), 0.0, 1.0]]
    model = await status(echo_app)
    assert model["state"] == "ready" and model["worker"]["pid"] == pid

    monkeypatch.undo()  # room again: the large payload goes through
    code, body, _ = await infer(echo_app, LARGE)
    assert code == 200, body
    assert [row[0] for row in body["output"]["embeddings"]] == [90_000.0] * 24


async def test_no_room_for_the_rings_fails_the_load_not_the_server(
    echo_app: AppUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_room(monkeypatch)
    code, body, _ = await infer(echo_app, "first")
    assert code == 503, body
    error = body["error"]
    assert error["code"] == "model_load_failed"
    assert "/dev/shm" in error["message"] and "no room for the worker's rings" in error["message"]
    assert (await status(echo_app))["state"] == "failed"
    assert segments.our_segments(echo_app.scheduler.instance_id) == []
    assert (await echo_app.client.get("/health/live")).status_code == 200

    monkeypatch.undo()
    assert (await echo_app.client.post("/api/v1/models/echo/load")).status_code < 300
    for _ in range(3000):  # the worker's start, polled: another process
        if (await status(echo_app))["state"] == "ready":
            break
        await anyio.sleep(0.02)
    code, body, _ = await infer(echo_app, "again")
    assert code == 200, body


async def test_a_batch_refused_for_room_gives_back_the_segments_it_took(
    echo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two large inputs, room for the first only: the batch fails with 503 and the first
    input's segment is free again at once (not held until the worker ends)."""
    spec = WorkerSpec("echo", "1.0.0", str(echo_dir), "txt2embed", "worker_pipelines:Echo")
    async with (
        WorkerHandle.open(
            spec,
            instance_id=segments.new_instance_id(),
            request_ring_bytes=1 << 16,
            response_ring_bytes=1 << 16,
            start_timeout_s=60,
            stop_grace_s=5,
            env=worker_env(),
        ) as handle,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(handle.read_loop)
        pool = handle._pool
        monkeypatch.setattr(
            segments,
            "shm_room",
            lambda: segments.ShmRoom(total=64 * MiB, free=8 * MiB - pool.statistics().total_bytes),
        )
        inputs = {"text": ["a" * 90_000] * 30, "extra": ["b" * 90_000] * 60}  # 2.7 MB fits, 5.4 MB does not
        with pytest.raises(SharedMemoryFull):
            await handle.infer(inputs, {})
        stats = pool.statistics()
        assert (stats.segments, stats.in_use) == (1, 0)  # the first input's segment, idle and warm
        out = await handle.infer({"text": ["a" * 90_000] * 30}, {})  # it serves the next batch
        assert isinstance(out["embeddings"], TensorData) and out["embeddings"].shape == (30, 4)
        assert pool.statistics().reused == 1
        tg.cancel_scope.cancel()
