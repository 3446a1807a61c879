"""The jobs API in process: a real scheduler with Echo (and Painter) workers, the SQLite job store
and the runner running."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from modelmora.api import create_app, job_result_body
from modelmora.ipc import segments
from modelmora.jobs import JobRunner, SQLiteJobStore
from modelmora.registry import SQLiteStore, install
from modelmora.results import open_result_store
from modelmora.scheduler import Scheduler
from modelmora.service import InferenceService

from conftest import ECHO, make_settings, worker_env


@dataclass
class JobsApp:
    client: httpx.AsyncClient
    runner: JobRunner
    jobs: SQLiteJobStore
    model_dir: str


@pytest.fixture
async def jobs_app(tmp_path: Path, echo_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[JobsApp]:
    marker = request.node.get_closest_marker("settings")
    overrides: dict[str, Any] = {"job_retry_base_s": 0.01, "job_retry_max_s": 0.05, **(marker.kwargs if marker else {})}
    home = tmp_path / "home"
    settings = make_settings(home, **overrides)
    store = SQLiteStore(home / "registry.sqlite3")
    install(store, home, str(echo_dir), model_id="echo", task="txt2embed")
    install(store, home, str(echo_dir), model_id="painter", task="txt2img")
    rec = store.get("echo")
    assert rec is not None
    jobs = SQLiteJobStore(home / "jobs.sqlite3")
    scheduler = Scheduler(
        settings,
        segments.new_instance_id(),
        pipelines={**ECHO, "txt2img": "worker_pipelines:Painter"},
        worker_env=worker_env(),
    )
    async with open_result_store(settings) as results, anyio.create_task_group() as tg:
        service = InferenceService(settings, store, scheduler, results)
        runner = JobRunner(settings, jobs, service, job_result_body)
        await tg.start(scheduler.run)
        await tg.start(runner.run)
        transport = httpx.ASGITransport(app=create_app(service, jobs=runner))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield JobsApp(client, runner, jobs, rec.versions[0].path)
        tg.cancel_scope.cancel()
    store.close()
    jobs.close()
    assert segments.our_segments(scheduler.instance_id) == []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "answers(*statuses): the callback receiver's answers, in order (the last repeats)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The store tests' PostgreSQL runs exist on asyncio only (asyncpg): their trio twins are dropped."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        (drop if params.get("anyio_backend") == "trio" and params.get("store") == "postgres" else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
