"""WorkerHandle over real Echo workers: the stall watchdog, stopping a stopped worker, cancellation.

Workers are spawned (the stall test also forks them from a zygote that preloads only numpy) and
run the light Echo pipeline of tests/worker_pipelines.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest
import structlog

from modelmora.errors import WorkerCrashed
from modelmora.ipc import segments
from modelmora.lifecycle import (
    Launcher,
    SpawnLauncher,
    WorkerHandle,
    WorkerSpec,
    WorkerStatistics,
    ZygoteLauncher,
    heartbeat_interval,
    worker_environment,
)

from conftest import worker_env

pytestmark = pytest.mark.anyio

ECHO = "worker_pipelines:Echo"
SAFETY_S = 60
"""A safety net against a hang, never a performance bound."""


@asynccontextmanager
async def echo_worker(
    tmp_path: Any, *, stall_s: float, stop_grace_s: float = 1.0, launcher: Launcher | None = None
) -> AsyncIterator[WorkerHandle]:
    spec = WorkerSpec("echo", "1.0.0", str(tmp_path), "txt2embed", ECHO)
    async with WorkerHandle.open(
        spec,
        instance_id=segments.new_instance_id(),
        request_ring_bytes=1 << 16,
        response_ring_bytes=1 << 16,
        start_timeout_s=SAFETY_S,
        stop_grace_s=stop_grace_s,
        env=worker_env(),
        launcher=launcher or SpawnLauncher(),
        stall_s=stall_s,
    ) as handle:
        yield handle


def resume(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def test_heartbeat_interval() -> None:
    assert heartbeat_interval(0) == 0
    assert heartbeat_interval(2.0) == 0.5
    assert heartbeat_interval(300.0) == 5.0


async def test_a_busy_worker_is_not_stalled(tmp_path: Any) -> None:
    """A batch that computes for several stall periods: heartbeats keep the worker alive."""
    with anyio.fail_after(SAFETY_S):
        async with echo_worker(tmp_path, stall_s=1.5) as handle, anyio.create_task_group() as tg:
            tg.start_soon(handle.read_loop)
            out = await handle.infer({"text": ["__sleep__4.5"]}, {})
            assert out["embeddings"].rows()[0][0] == len("__sleep__4.5")
            assert not handle.dead and handle.crash_reason is None
            tg.cancel_scope.cancel()


@pytest.fixture(params=["spawn", "zygote"])
async def launcher(request: pytest.FixtureRequest) -> AsyncIterator[Launcher]:
    if request.param == "spawn":
        yield SpawnLauncher()
        return
    zygote = ZygoteLauncher(env=worker_environment(worker_env(), 1), preload=("numpy",), stop_grace_s=2.0)
    async with zygote.running():
        assert await zygote.wait_ready()
        yield zygote


async def test_a_stopped_worker_is_reported_killed_and_its_batch_fails(tmp_path: Any, launcher: Launcher) -> None:
    with structlog.testing.capture_logs() as logs, anyio.fail_after(SAFETY_S):
        async with echo_worker(tmp_path, stall_s=1.0, launcher=launcher) as handle, anyio.create_task_group() as tg:
            tg.start_soon(handle.read_loop)
            assert (await handle.infer({"text": ["warm"]}, {}))["embeddings"].rows()[0][0] == 4
            os.kill(handle.pid, signal.SIGSTOP)
            try:
                with pytest.raises(WorkerCrashed, match="stalled"):
                    await handle.infer({"text": ["in flight"]}, {})
                assert handle.dead and handle.crashed and handle.crash_reason == "stalled"
                assert await handle.process.wait() == -signal.SIGKILL
                assert handle.forked is isinstance(launcher, ZygoteLauncher)
                with pytest.raises(WorkerCrashed):  # no new batch for a dead worker
                    await handle.infer({"text": ["after"]}, {})
            finally:
                resume(handle.pid)
    stalls = [e for e in logs if e["event"] == "worker_stalled"]
    assert len(stalls) == 1 and stalls[0]["pid"] == handle.pid and stalls[0]["in_flight_batches"] == 1


async def test_stopping_a_stopped_worker_kills_it(tmp_path: Any) -> None:
    """Without the watchdog, stop ends a SIGSTOPped worker (it ignores Shutdown and SIGTERM) by SIGKILL,
    even while a large Infer frame fills its socket and holds the channel."""
    with structlog.testing.capture_logs() as logs, anyio.fail_after(SAFETY_S):
        async with anyio.create_task_group() as outer:
            async with echo_worker(tmp_path, stall_s=0, stop_grace_s=0.5) as handle:
                outer.start_soon(handle.read_loop)
                os.kill(handle.pid, signal.SIGSTOP)
                results: list[BaseException] = []

                async def blocked_infer() -> None:
                    try:
                        await handle.infer({"text": ["x"]}, {"pad": "p" * 8_000_000})  # more than a socket buffer
                    except WorkerCrashed as exc:
                        results.append(exc)

                outer.start_soon(blocked_infer)
                await anyio.wait_all_tasks_blocked()
            assert handle.dead and not handle.crashed
            assert await handle.process.wait() == -signal.SIGKILL
            outer.cancel_scope.cancel()
    assert any(e["event"] == "worker_kill" and e["pid"] == handle.pid for e in logs)


async def test_a_cancelled_caller_stops_the_batch_in_the_worker(tmp_path: Any) -> None:
    """Cancelled inside `infer`, the caller tells the worker, which stops at its next step."""
    with structlog.testing.capture_logs() as logs, anyio.fail_after(SAFETY_S):
        async with echo_worker(tmp_path, stall_s=0) as handle, anyio.create_task_group() as tg:
            tg.start_soon(handle.read_loop)
            with anyio.CancelScope() as scope:

                async def cancel_once_running() -> None:
                    await anyio.sleep(0.3)
                    scope.cancel()

                tg.start_soon(cancel_once_running)
                await handle.infer({"text": ["__steps__1000"]}, {})  # 100 s in 0.1 s steps
            assert scope.cancelled_caught
            while handle.statistics().in_flight_batches:  # the worker answers the cancelled batch  # noqa: ASYNC110
                await anyio.sleep(0.05)
            assert (await handle.infer({"text": ["next"]}, {}))["embeddings"].rows()[0][0] == 4
            tg.cancel_scope.cancel()
    assert [e["batch"] for e in logs if e["event"] == "worker_batch_cancelled"] == [1]


async def test_statistics_encode_as_the_status_fields(tmp_path: Any) -> None:
    with anyio.fail_after(SAFETY_S):
        async with echo_worker(tmp_path, stall_s=0) as handle:
            stats = handle.statistics()
    assert isinstance(stats, WorkerStatistics)
    doc = msgspec.json.decode(msgspec.json.encode(stats))
    assert list(doc) == [
        "pid",
        "in_flight_batches",
        "streams",
        "rss_mb",
        "device",
        "load_ms",
        "forked",
        "start_ms",
        "uptime_s",
        "request_ring_used_bytes",
        "vram_mb",
        "ring_bytes",
        "pool_bytes",
        "pool_in_use_bytes",
    ]
    assert doc["pid"] == handle.pid and doc["forked"] is False and doc["device"] == "cpu"
    assert set(doc["start_ms"]) == {"launch", "boot", "import", "load", "warmup", "total"}


@pytest.mark.parametrize("zygote", [False, True], ids=["spawn", "zygote"])
async def test_the_current_directory_never_shadows_the_worker_packages(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, zygote: bool
) -> None:
    """A server started from a directory that holds another `modelmora` (a checkout of another
    version, say) still starts workers of its own."""
    shadow = tmp_path / "cwd"
    for package in ("modelmora", "modelmora_workers"):
        (shadow / package).mkdir(parents=True)
        (shadow / package / "__init__.py").write_text("raise ImportError('the wrong package')\n")
    monkeypatch.chdir(shadow)
    model = tmp_path / "model"
    model.mkdir()
    with anyio.fail_after(SAFETY_S):
        if zygote:
            launcher = ZygoteLauncher(env=worker_environment(worker_env(), 1), preload=("numpy",))
            async with launcher.running():
                assert await launcher.wait_ready()
                async with echo_worker(model, stall_s=0, launcher=launcher) as handle:
                    assert handle.statistics().forked
        else:
            async with echo_worker(model, stall_s=0) as handle:
                assert not handle.statistics().forked
