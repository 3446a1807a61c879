"""The job runner when its server stops (asyncio and trio, real Echo workers, SQLite store):
draining, it claims nothing more (queued jobs stay queued) while the running job finishes; a
runner cancelled with a job running puts that job back in the queue at once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from modelmora.api import job_result_body
from modelmora.ipc import segments
from modelmora.jobs import JobRequest, JobRunner, SQLiteJobStore
from modelmora.registry import SQLiteStore, install
from modelmora.results import open_result_store
from modelmora.scheduler import Scheduler
from modelmora.service import InferenceService

from conftest import ECHO, make_settings, worker_env

pytestmark = pytest.mark.anyio


@dataclass
class Running:
    runner: JobRunner
    jobs: SQLiteJobStore
    scope: anyio.CancelScope
    """Cancels the runner alone."""


@asynccontextmanager
async def running(tmp_path: Path, echo_dir: Path) -> AsyncIterator[Running]:
    home = tmp_path / "home"
    settings = make_settings(home, job_concurrency=1)
    store = SQLiteStore(home / "registry.sqlite3")
    install(store, home, str(echo_dir), model_id="echo", task="txt2embed")
    jobs = SQLiteJobStore(home / "jobs.sqlite3")
    scheduler = Scheduler(settings, segments.new_instance_id(), pipelines=ECHO, worker_env=worker_env())
    try:
        async with open_result_store(settings) as results, anyio.create_task_group() as tg:
            service = InferenceService(settings, store, scheduler, results)
            runner = JobRunner(settings, jobs, service, job_result_body)
            await tg.start(scheduler.run)
            scope = anyio.CancelScope()

            async def run_runner() -> None:
                with scope:
                    await runner.run()

            tg.start_soon(run_runner)
            yield Running(runner, jobs, scope)
            tg.cancel_scope.cancel()
    finally:
        store.close()
        jobs.close()
    assert segments.our_segments(scheduler.instance_id) == []


async def _submit(run: Running, text: str) -> str:
    rec, _ = await run.runner.submit("echo", JobRequest(input_data={"text": [text]}), protocol="rest")
    return rec.id


async def _status(run: Running, job_id: str) -> str:
    rec = await run.jobs.get(job_id)
    assert rec is not None
    return rec.status


async def _wait_status(run: Running, job_id: str, status: str) -> None:
    with anyio.fail_after(120):  # a safety net, not a performance bound
        while True:
            if await _status(run, job_id) == status:
                return
            await anyio.sleep(0.02)


async def test_draining_claims_nothing_more_and_lets_the_running_job_finish(tmp_path: Path, echo_dir: Path) -> None:
    gate = tmp_path / "release"
    async with running(tmp_path, echo_dir) as run:
        first = await _submit(run, f"__until__{gate}")
        await _wait_status(run, first, "running")
        second = await _submit(run, "queued")  # job_concurrency = 1: it waits for the first
        run.runner.drain()
        gate.touch()
        await run.runner.wait_idle()
        assert await _status(run, first) == "completed"
        for _ in range(20):  # the runner woke when the first ended, and more: still not claimed
            await anyio.sleep(0.01)
        assert await _status(run, second) == "queued"
        assert run.runner.statistics()["running"] == 0


async def test_a_runner_cancelled_with_a_job_running_puts_it_back_in_the_queue(tmp_path: Path, echo_dir: Path) -> None:
    gate = tmp_path / "release"
    async with running(tmp_path, echo_dir) as run:
        job = await _submit(run, f"__until__{gate}")
        await _wait_status(run, job, "running")
        run.scope.cancel()
        await _wait_status(run, job, "queued")  # without waiting for its lease to expire
        rec = await run.jobs.get(job)
        assert rec is not None and rec.attempts == 1
        gate.touch()  # the batch the worker still runs ends, so that the worker stops at once
