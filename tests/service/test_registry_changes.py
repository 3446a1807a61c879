"""A model version never serves from a stale worker: settings, reinstalls and uninstalls reach
the running workers (through the core's registry sync), on asyncio and trio."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import psutil
import pytest

from modelmora.registry import install, uninstall
from modelmora.service import ServerStatus

from conftest import AppUnderTest

pytestmark = pytest.mark.anyio


async def status_of(app: AppUnderTest, model: str) -> dict[str, Any]:
    models = (await app.client.get("/api/v1/status")).json()["models"]
    return next(m for m in models if m["model_id"] == model)


async def embed(app: AppUnderTest, model: str = "echo") -> int:
    r = await app.client.post(f"/api/v1/infer/{model}", json={"input_data": {"text": "hi"}})
    return r.status_code


async def wait_state(app: AppUnderTest, model: str, state: str) -> dict[str, Any]:
    for _ in range(1000):
        st = await status_of(app, model)
        if st["state"] == state:
            return st
        await anyio.sleep(0.02)
    raise AssertionError(f"{model} never became {state}: {st}")


@pytest.mark.settings(keep_alive="-1")
async def test_a_device_change_reaches_the_next_worker(echo_app: AppUnderTest) -> None:
    assert await embed(echo_app) == 200
    assert (await status_of(echo_app, "echo"))["device"] == "cpu"
    assert (
        await echo_app.client.put("/api/v1/models/echo", json={"device": "cuda", "dtype": "float16"})
    ).status_code == 200
    await wait_state(echo_app, "echo", "cached")  # the idle worker is retired at once
    assert await embed(echo_app) == 200
    st = await status_of(echo_app, "echo")
    assert st["device"] == "cuda"  # the Echo pipeline reports the device it was started for
    assert st["loads"] == 2


@pytest.mark.settings(keep_alive="-1")
async def test_a_keep_alive_change_reaches_an_idle_worker(echo_app: AppUnderTest) -> None:
    assert await embed(echo_app) == 200
    assert (await echo_app.client.put("/api/v1/models/echo", json={"keep_alive": "0"})).status_code == 200
    st = await wait_state(echo_app, "echo", "cached")
    assert st["history"][-1]["reason"] == "worker stopped"


@pytest.mark.settings(keep_alive="-1")
async def test_a_reinstalled_model_is_served_by_a_new_worker(echo_app: AppUnderTest, echo_dir: Path) -> None:
    assert await embed(echo_app) == 200
    first = (await status_of(echo_app, "echo"))["worker"]["pid"]
    (echo_dir / "weights.bin").write_bytes(b"\1" * 64)  # new weights, installed again over the old
    install(echo_app.store, echo_app.home, str(echo_dir), model_id="echo", task="txt2embed", force=True)
    await echo_app.service.sync_registry()
    await wait_state(echo_app, "echo", "cached")
    assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE
    assert await embed(echo_app) == 200
    st = await status_of(echo_app, "echo")
    assert st["worker"]["pid"] != first
    assert st["loads"] == 2


@pytest.mark.settings(keep_alive="-1")
async def test_an_uninstalled_model_stops_its_worker(echo_app: AppUnderTest) -> None:
    assert await embed(echo_app) == 200
    pid = (await status_of(echo_app, "echo"))["worker"]["pid"]
    uninstall(echo_app.store, echo_app.home, "echo")
    await echo_app.service.sync_registry()
    for _ in range(1000):
        if not echo_app.scheduler.models:
            break
        await anyio.sleep(0.02)
    assert not echo_app.scheduler.models  # its task ended
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert (await echo_app.client.get("/api/v1/status")).json()["models"] == []
    assert await embed(echo_app) == 404


@pytest.mark.settings(load_retry_base_s=60.0, load_retry_attempts=5)
async def test_uninstalling_a_failed_model_stops_its_retries(echo_app: AppUnderTest, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "FAIL_LOAD").write_text("")
    install(echo_app.store, echo_app.home, str(broken), model_id="broken", task="txt2embed", check_files=False)
    assert await embed(echo_app, "broken") == 503
    assert (await echo_app.client.get("/health/models")).status_code == 503
    uninstall(echo_app.store, echo_app.home, "broken")
    await echo_app.service.sync_registry()
    for _ in range(1000):
        if not any(k.model_id == "broken" for k in echo_app.scheduler.models):
            break
        await anyio.sleep(0.02)
    assert not any(k.model_id == "broken" for k in echo_app.scheduler.models)
    health = await echo_app.client.get("/health/models")
    assert health.status_code == 200
    assert [m["model_id"] for m in health.json()["models"]] == ["echo"]


async def test_status_and_health_list_every_registered_model(echo_app: AppUnderTest, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(b"\0")
    install(echo_app.store, echo_app.home, str(src), model_id="idle", task="txt2embed", check_files=False)
    assert await embed(echo_app) == 200
    states = {m["model_id"]: m["state"] for m in (await echo_app.client.get("/api/v1/status")).json()["models"]}
    assert states == {"echo": "ready", "idle": "cached"}
    health = (await echo_app.client.get("/health/models")).json()["models"]
    assert {(h["model_id"], h["healthy"]) for h in health} == {("echo", True), ("idle", True)}


async def test_status_counts_the_supervisor_and_shared_memory(echo_app: AppUnderTest) -> None:
    assert await embed(echo_app) == 200
    raw = (await echo_app.client.get("/api/v1/status")).content
    msgspec.json.decode(raw, type=ServerStatus)  # the body is what the OpenAPI schema says
    status = msgspec.json.decode(raw)
    worker = status["models"][0]["worker"]
    assert worker["ring_bytes"] >= 2 * echo_app.settings.request_ring_mb * 2**20 // 2  # both rings
    assert status["shared_memory"]["workers_bytes"] == worker["ring_bytes"] + worker["pool_bytes"]
    assert status["shared_memory"]["free_bytes"] <= status["shared_memory"]["total_bytes"]
    assert status["supervisor"]["rss_mb"] > 0
