"""No error inside one model's supervision or one periodic task ends the server: it is logged,
counted, and that model fails (503) or that task goes on (asyncio and trio)."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import anyio
import pytest

from modelmora.registry import install
from modelmora.scheduler import admission

from conftest import AppUnderTest

pytestmark = pytest.mark.anyio


async def embed(app: AppUnderTest, model: str) -> tuple[int, dict[str, Any]]:
    r = await app.client.post(f"/api/v1/infer/{model}", json={"input_data": {"text": "hi"}})
    return r.status_code, r.json()


@pytest.mark.settings(load_retry_base_s=60.0)  # no background retry during the test
async def test_an_unexpected_error_in_one_models_load_fails_that_model_only(
    echo_app: AppUnderTest, echo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(echo_app.store, echo_app.home, str(echo_dir), model_id="other", task="txt2embed")
    adm = echo_app.scheduler.admission
    measure = adm.measure

    async def broken(rt: Any, pid: int) -> None:
        if rt.key.model_id == "echo":
            raise ValueError("a bug in the supervisor")
        await measure(rt, pid)

    monkeypatch.setattr(adm, "measure", broken)
    code, body = await embed(echo_app, "echo")
    assert code == 503
    assert body["error"]["code"] == "model_load_failed"
    assert "ValueError" not in body["error"]["message"]  # internal text stays in the log
    assert (await embed(echo_app, "other"))[0] == 200  # the server and the other model go on
    health = {m["model_id"]: m["healthy"] for m in (await echo_app.client.get("/health/models")).json()["models"]}
    assert health == {"echo": False, "other": True}


@pytest.mark.settings(memory_poll_ms=10)
async def test_the_memory_monitor_survives_running_out_of_file_descriptors(
    echo_app: AppUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (await embed(echo_app, "echo"))[0] == 200

    def no_descriptors(*args: object) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(admission, "_read_pss", no_descriptors)
    adm = echo_app.scheduler.admission
    for _ in range(1000):
        if adm.monitor_errors >= 3:
            break
        await anyio.sleep(0.01)
    assert adm.monitor_errors >= 3  # several rounds failed, each logged and counted
    assert (await embed(echo_app, "echo"))[0] == 200  # and the server still serves


async def test_a_failed_registry_sync_is_counted_and_the_next_one_runs(
    echo_app: AppUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = echo_app.service
    sync = service.scheduler.sync

    def broken(records: object) -> None:
        raise RuntimeError("a bug in the sync")

    monkeypatch.setattr(service.scheduler, "sync", broken)
    await service.sync_registry()
    assert service.sync_errors == 1
    monkeypatch.setattr(service.scheduler, "sync", sync)
    await service.sync_registry()
    assert service.sync_errors == 1
    assert (await embed(echo_app, "echo"))[0] == 200
