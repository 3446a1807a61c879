"""Unload never hangs: after `unload_grace_s` the running batches are stopped too, and a worker
that does not exit (stopped with SIGSTOP) is killed after `worker_stop_grace_s`."""

from __future__ import annotations

import os
import signal

import anyio
import psutil
import pytest

from conftest import AppUnderTest

pytestmark = pytest.mark.anyio


@pytest.mark.settings(unload_grace_s=0.3, worker_stop_grace_s=0.3, keep_alive="-1")
async def test_unload_of_a_stopped_busy_worker_finishes(echo_app: AppUnderTest) -> None:
    client = echo_app.client
    assert (await client.post("/api/v1/models/echo/load")).status_code == 200
    pid = (await client.get("/api/v1/status")).json()["models"][0]["worker"]["pid"]
    answers: list[int] = []
    async with anyio.create_task_group() as tg:

        async def slow() -> None:
            r = await client.post("/api/v1/infer/echo", json={"input_data": {"text": "__sleep__60"}})
            answers.append(r.status_code)

        tg.start_soon(slow)
        for _ in range(1000):  # until its batch runs in the worker
            st = (await client.get("/api/v1/status")).json()["models"][0]
            if st["busy"]:
                break
            await anyio.sleep(0.01)
        os.kill(pid, signal.SIGSTOP)  # hung: answers nothing, ignores SIGTERM
        try:
            r = await client.post("/api/v1/models/echo/unload")
        finally:
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGCONT)
        assert r.status_code == 200
        assert r.json()["state"] == "cached"
    assert answers == [503]  # the request it held fails clearly
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert (await client.post("/api/v1/infer/echo", json={"input_data": {"text": "again"}})).status_code == 200
