"""The zygote launcher: forked workers, their exit statuses, failures and fallbacks (asyncio and trio).

The zygotes here preload only numpy, so that they are ready in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from modelmora.errors import ModelLoadFailed
from modelmora.ipc import segments
from modelmora.ipc import zygote as zw
from modelmora.ipc.control import ProtocolError
from modelmora.lifecycle import SpawnLauncher, WorkerHandle, WorkerSpec, ZygoteLauncher, worker_environment
from modelmora.lifecycle.budget import process_memory
from modelmora.lifecycle.zygote_client import ForkedProcess, ZygoteClient, ZygoteUnavailable

from conftest import TESTS_DIR

HERE = Path(__file__).parent
PROBE = "zygote_pipelines:Probe"
ECHO = "worker_pipelines:Echo"


def light_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    return worker_environment({**env, **extra}, 1)


def launcher(**kw: Any) -> ZygoteLauncher:
    return ZygoteLauncher(**{"env": light_env(), "preload": ("numpy",), "stop_grace_s": 2.0, **kw})


@asynccontextmanager
async def worker(launch: Any, env: dict[str, str] | None = None, *, read: bool = True) -> AsyncIterator[WorkerHandle]:
    """A Probe worker; `read`: with its read loop running (else the test runs it)."""
    spec = WorkerSpec("probe", "1.0.0", "/nonexistent", "txt2embed", PROBE)
    async with (
        WorkerHandle.open(
            spec,
            instance_id=segments.new_instance_id(),
            request_ring_bytes=1 << 16,
            response_ring_bytes=1 << 16,
            start_timeout_s=30,
            stop_grace_s=2,
            env=env if env is not None else light_env(),
            launcher=launch,
        ) as handle,
        anyio.create_task_group() as tg,
    ):
        if read:
            tg.start_soon(handle.read_loop)
        yield handle
        tg.cancel_scope.cancel()


async def wait_state(zl: ZygoteLauncher, state: str, timeout_s: float = 15) -> None:
    with anyio.fail_after(timeout_s):
        await zl.wait_for(state)


def gone(pid: int, timeout_s: float = 5) -> bool:
    """True once `pid` has exited (gone, or a zombie awaiting a reaper that may never come)."""
    try:
        proc = psutil.Process(pid)
        proc.wait(timeout_s)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return proc.status() == psutil.STATUS_ZOMBIE
    return True


async def probe(handle: WorkerHandle) -> list[float]:
    out = await handle.infer({"text": ["x"]}, {})
    return out["embeddings"].rows()[0]


class TestForkedWorkers:
    pytestmark = pytest.mark.anyio

    async def test_worker_is_a_child_of_the_zygote(self) -> None:
        zl = launcher()
        async with zl.running():
            assert await zl.wait_ready()
            async with worker(zl) as handle:
                row = await probe(handle)
                assert row[2] == zl.pid  # parent: the zygote, not us
                assert handle.forked and handle.pid != zl.pid
                assert psutil.Process(handle.pid).ppid() == zl.pid
                assert set(handle.start_ms) == {"launch", "boot", "import", "load", "warmup", "total"}
                assert handle.statistics().forked is True
                stats = zl.statistics()
                assert stats["state"] == "ready" and stats["pid"] == zl.pid and stats["workers"] == 1
                assert stats["pss_mb"] > 0 and stats["rss_mb"] >= stats["pss_mb"]
                assert stats["forks"] == 1 and stats["spawned_instead"] == 0
                assert (zl.shared_pss_bytes() or 0) > 2**20
                process = handle.process
            assert process.returncode == 0  # the zygote reaped it and told us
            assert zl.statistics()["workers"] == 0
        assert zl.state == "stopped" and zl.pid is None and zl.shared_pss_bytes() is None

    async def test_workers_get_their_own_random_streams_and_environment(self) -> None:
        zl = launcher(env=light_env(MM_ONLY_IN_THE_ZYGOTE="1"))
        env_b = light_env(MM_PROBE="7", PYTHONPATH=os.pathsep.join((str(HERE / "extra"), str(HERE), str(TESTS_DIR))))
        async with zl.running(), worker(zl, env=zl.env) as a, worker(zl, env=env_b) as b:
            ra, rb = await probe(a), await probe(b)
        assert ra[0] != rb[0], "random: forked workers share a seed"
        assert ra[1] != rb[1], "numpy: forked workers share a seed"
        assert ra[3] == -1 and rb[3] == 7  # the environment difference reached only b
        assert rb[4] == 0 and ra[4] == 1  # b lost a variable of the zygote's
        assert rb[5] == 1 and ra[5] == 0  # b's extra PYTHONPATH entry is on its sys.path

    @pytest.mark.parametrize("forked", [True, False])
    async def test_tokenizer_threads_start_in_the_worker(self, forked: bool) -> None:
        """The zygote keeps the tokenizers' thread pool off (it must not exist before a fork) and asks
        torch about CUDA through NVML; each worker turns the pool on with its own thread count."""
        env = {k: v for k, v in light_env().items() if k not in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
        zl = launcher(env=env) if forked else SpawnLauncher()
        async with zl.running() if forked else contextlib.nullcontext(), worker(zl, env=env) as handle:
            assert handle.forked is forked
            row = await probe(handle)
        assert row[6] == 1 and row[7] == 1  # parallel, on the worker's 1 thread
        assert row[8] == forked  # only the zygote sets the NVML check

    @pytest.mark.parametrize("forked", [True, False])
    async def test_tokenizer_parallelism_set_by_the_user_is_kept(self, forked: bool) -> None:
        env = {**light_env(), "TOKENIZERS_PARALLELISM": "false"}
        env.pop("RAYON_NUM_THREADS", None)
        zl = launcher(env=env) if forked else SpawnLauncher()
        async with zl.running() if forked else contextlib.nullcontext(), worker(zl, env=env) as handle:
            row = await probe(handle)
        assert row[6] == 0 and row[7] == -1

    async def test_kill_through_the_pidfd(self) -> None:
        zl = launcher()
        async with zl.running(), worker(zl) as handle:
            process = handle.process
            process.kill()
            with anyio.fail_after(10):
                assert await process.wait() == -signal.SIGKILL
            process.kill()  # gone: nothing happens
        process.close()  # closed already: nothing happens
        with pytest.raises(anyio.ClosedResourceError):
            await ForkedProcess(1, -1).wait()

    async def test_a_zygote_that_dies_while_forking(self) -> None:
        zl = launcher(restart_delay_s=60)
        async with zl.running():
            assert await zl.wait_ready() and zl.pid is not None
            os.kill(zl.pid, signal.SIGSTOP)  # it will never answer
            async with anyio.create_task_group() as tg:

                async def start() -> None:
                    async with worker(zl) as handle:  # the fork fails: spawned instead
                        assert (await probe(handle))[2] == os.getpid()

                tg.start_soon(start)
                await anyio.wait_all_tasks_blocked()
                os.kill(zl.pid, signal.SIGKILL)
            assert zl.spawns == 1 and zl.state == "down"

    async def test_a_zygote_that_cannot_be_started(self) -> None:
        zl = launcher(python="/nonexistent/python", max_start_failures=1, fallback=SpawnLauncher())
        async with zl.running():
            assert not await zl.wait_ready() and zl.state == "failed"

    async def test_a_zygote_that_speaks_nonsense(self) -> None:
        class Process:
            pid = 1

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        zygote = ZygoteClient(Process(), ours)  # type: ignore[arg-type]
        with theirs:
            r, w = os.pipe()
            zw.send_packet(theirs, zw.Forked(5, 1234), [r])  # answers no request: descriptor closed
            zw.send_packet(theirs, zw.ForkFailed(6, "x"))
            zw.send_packet(theirs, zw.Exited(1234, 0))
            zw.send_packet(theirs, zw.Fork(1))
            with pytest.raises(ProtocolError, match="unexpected message"):
                await zygote.serve()
            zygote.close()
            os.close(r)
            with pytest.raises(BrokenPipeError):
                os.write(w, b"x")  # every read end is closed
            os.close(w)

    async def test_a_killed_worker_reports_its_signal(self) -> None:
        zl = launcher()
        async with zl.running(), worker(zl, read=False) as handle:
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(handle.read_loop)
                    await probe(handle)
                    os.kill(handle.pid, signal.SIGKILL)
                    assert await handle.process.wait() == -signal.SIGKILL
            assert handle.dead and handle.crashed

    async def test_zygote_death_spawns_meanwhile_then_restarts(self) -> None:
        zl = launcher(restart_delay_s=1.5)  # the window in which launches spawn
        async with zl.running():
            assert await zl.wait_ready()
            first = zl.pid
            assert first is not None
            async with worker(zl, read=False) as handle:
                with anyio.fail_after(10):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(handle.read_loop)
                        await probe(handle)
                        os.kill(first, signal.SIGKILL)
                        # the worker dies with its zygote (PR_SET_PDEATHSIG); its status is unknown
                        assert await handle.process.wait() is None
                assert handle.dead and handle.crashed
            await wait_state(zl, "down")
            async with worker(zl) as spawned:  # no zygote for now: spawned, our own child
                assert (await probe(spawned))[2] == os.getpid() and not spawned.forked
            assert zl.spawns == 1
            await wait_state(zl, "ready")
            assert zl.pid not in (None, first) and zl.starts == 2
            async with worker(zl) as again:
                assert (await probe(again))[2] == zl.pid

    async def test_a_zygote_that_never_starts_is_given_up(self) -> None:
        zl = launcher(
            preload=("zygote_exit_on_import",), max_start_failures=2, restart_delay_s=0.01, fallback=SpawnLauncher()
        )
        async with zl.running():
            await wait_state(zl, "failed")
            assert zl.starts == 2 and not await zl.wait_ready()
            async with worker(zl) as handle:
                assert (await probe(handle))[2] == os.getpid()
            assert zl.statistics()["spawned_instead"] == 1 and zl.statistics()["pid"] is None

    async def test_a_zygote_slower_than_its_timeout_is_killed(self) -> None:
        zl = launcher(preload=("zygote_slow_import",), ready_timeout_s=0.5, max_start_failures=1, stop_grace_s=0.2)
        async with zl.running():
            with anyio.fail_after(10):
                assert not await zl.wait_ready()
            assert zl.state == "failed"

    async def test_spawn_when_not_running(self) -> None:
        zl = launcher()
        async with worker(zl) as handle:  # outside `running()`: no zygote at all
            assert not handle.forked and (await probe(handle))[2] == os.getpid()

    async def test_fork_failure_is_a_load_failure(self) -> None:
        zl = launcher()
        async with zl.running():
            assert await zl.wait_ready()
            zygote = zl._zygote
            assert zygote is not None
            send = zygote._send

            async def without_descriptors(msg: zw.ZygoteMessage, fds: list[int]) -> None:
                await send(msg, [])

            zygote._send = without_descriptors  # type: ignore[method-assign]
            a, b = socket.socketpair()
            with a, b, pytest.raises(ModelLoadFailed, match="exactly one socket"):
                await zygote.fork(b, {}, [])
            zygote._send = send  # type: ignore[method-assign]
            async with worker(zl) as handle:  # the zygote still serves
                assert (await probe(handle))[2] == zl.pid

    async def test_a_cancelled_launch_leaves_nothing_behind(self) -> None:
        zl = launcher()
        async with zl.running():
            assert await zl.wait_ready()
            zygote = zl._zygote
            assert zygote is not None and zl.pid is not None
            parent, child = socket.socketpair()
            parent.settimeout(10)
            with parent:
                os.kill(zl.pid, signal.SIGSTOP)  # the zygote answers only after we gave up
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(zygote.fork, child, {}, [])
                        await anyio.wait_all_tasks_blocked()  # the request is sent, its answer awaited
                        tg.cancel_scope.cancel()
                    assert not zygote._pending
                finally:
                    os.kill(zl.pid, signal.SIGCONT)
                child.close()
                hello = await anyio.to_thread.run_sync(parent.recv, 4096)
                assert hello  # the orphan said hello; it exits at EOF on its socket
            await anyio.sleep(0.2)
            assert not zygote.children  # its answer found no request: its pidfd was closed
            async with worker(zl) as handle:
                assert (await probe(handle))[2] == zl.pid


class TestWire:
    def test_round_trip_with_a_descriptor(self) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        r, w = os.pipe()
        with a, b:
            zw.send_packet(a, zw.Fork(3, {"A": "1"}, ["B"]), [r])
            msg, fds = zw.recv_packet(b)
            assert msg == zw.Fork(3, {"A": "1"}, ["B"]) and len(fds) == 1
            os.write(w, b"ok")
            assert os.read(fds[0], 2) == b"ok"
            zw.close_fds([*fds, r, w])
            a.close()
            assert zw.recv_packet(b) == (None, [])

    def test_garbage_and_truncation_close_the_descriptors(self) -> None:
        r, w = os.pipe()
        with pytest.raises(ProtocolError, match="undecodable"):
            zw.decode(b"\xc1", 0, [r])
        with pytest.raises(OSError):
            os.fstat(r)
        with pytest.raises(ProtocolError, match="truncated"):
            zw.decode(zw.encode(zw.Exited(1, 0)), socket.MSG_CTRUNC, [w])
        with pytest.raises(OSError):
            os.fstat(w)
        with pytest.raises(ProtocolError, match="exceeds"):
            zw.encode(zw.Fork(1, {"X": "y" * zw.MAX_PACKET_BYTES}))

    def test_a_reset_connection_is_eof(self) -> None:
        class Reset(socket.socket):
            def recvmsg(self, *args: Any) -> Any:
                raise ConnectionResetError

        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with a, b:
            sock = Reset(fileno=os.dup(b.fileno()))
            with sock:
                assert zw.recv_packet(sock) == (None, [])

    def test_ready_checks(self) -> None:
        zl = launcher()

        def ready(**kw: Any) -> zw.Ready:
            fields = {"protocol": zw.ZYGOTE_PROTOCOL, "pid": 1, "import_ms": {}, "failed": {}, "threads": 1}
            return zw.Ready(**{**fields, "cuda_initialised": False, **kw})

        zl._check_ready(ready(failed={"x": "ImportError"}))  # only a warning
        with pytest.raises(ZygoteUnavailable) as info:
            zl._check_ready(ready(cuda_initialised=True))
        assert info.value.permanent and "CUDA" in str(info.value)
        with pytest.raises(ZygoteUnavailable) as info:
            zl._check_ready(ready(protocol=99))
        assert info.value.permanent
        with pytest.raises(ZygoteUnavailable, match="before it was ready"):
            zl._check_ready(None)
        assert process_memory(2**22 + 12345) is None


class TestZygoteProcess:
    """The zygote as a bare process, driven over its socket by this (blocking) test."""

    def start(self, *preload: str, grace_s: float = 2) -> tuple[subprocess.Popen[bytes], socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [sys.executable, "-m", "modelmora_workers.zygote", "--fd", str(theirs.fileno())]
        cmd += ["--ppid", str(os.getpid()), "--preload", ",".join(preload), "--grace", str(grace_s)]
        proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), env=light_env())
        theirs.close()
        ours.settimeout(30)
        return proc, ours

    def test_bad_requests_and_a_failed_import(self) -> None:
        proc, sock = self.start("numpy", "no_such_module_here")
        with sock:
            ready, _ = zw.recv_packet(sock)
            assert isinstance(ready, zw.Ready) and ready.pid == proc.pid
            assert "no_such_module_here" in ready.failed and not ready.cuda_initialised
            assert {"numpy", "psutil", "msgspec"} <= set(ready.import_ms) and ready.threads >= 1
            zw.send_packet(sock, zw.Fork(1))  # no socket attached
            assert zw.recv_packet(sock) == (zw.ForkFailed(1, "a fork request carries exactly one socket"), [])
            zw.send_packet(sock, zw.Exited(1, 0))  # not a request: ignored
            sock.send(b"\xc1")  # not a message: the zygote gives up
            assert proc.wait(30) == 0

    def fork(self, sock: socket.socket) -> tuple[socket.socket, int]:
        """Fork a worker; our end of its socket (after its Hello) and its pid."""
        parent, child = socket.socketpair()
        parent.settimeout(30)
        zw.send_packet(sock, zw.Fork(1), [child.fileno()])
        child.close()
        forked, fds = zw.recv_packet(sock)
        assert isinstance(forked, zw.Forked) and len(fds) == 1
        zw.close_fds(fds)
        assert parent.recv(4096)  # its Hello: the child is set up
        return parent, forked.pid

    def test_at_eof_children_get_a_grace_then_die_with_the_zygote(self) -> None:
        proc, sock = self.start("numpy", grace_s=0.3)
        assert isinstance(zw.recv_packet(sock)[0], zw.Ready)
        parent, pid = self.fork(sock)
        with parent:
            worker = psutil.Process(pid)
            assert worker.ppid() == proc.pid and worker.name() == "mm-worker"
            assert psutil.Process(proc.pid).name() == "mm-zygote"
            sock.close()  # the worker keeps running: the grace runs out
            assert proc.wait(30) == 0
            assert gone(pid)  # PR_SET_PDEATHSIG: gone with the zygote

    def test_at_eof_the_zygote_waits_for_exiting_children(self) -> None:
        proc, sock = self.start("numpy", grace_s=30)
        assert isinstance(zw.recv_packet(sock)[0], zw.Ready)
        parent, pid = self.fork(sock)
        sock.close()
        parent.close()  # the worker exits at EOF; the zygote reaps it, then exits at once
        assert proc.wait(10) == 0
        assert not psutil.pid_exists(pid)


def test_zygote_settings_from_the_environment() -> None:
    from modelmora.config import load_settings

    settings = load_settings(None, environ={"MODELMORA_ZYGOTE": "false", "MODELMORA_ZYGOTE_PRELOAD": "numpy, torch,"})
    assert settings.zygote is False and settings.zygote_preload == ("numpy", "torch")
    assert load_settings(None, environ={}).zygote is True


def test_make_launcher_follows_the_settings() -> None:
    from modelmora.config import load_settings
    from modelmora.server import make_launcher

    spawn = make_launcher(load_settings(None, environ={"MODELMORA_ZYGOTE": "false"}))
    assert isinstance(spawn, SpawnLauncher) and spawn.statistics() is None
    zl = make_launcher(load_settings(None, environ={"MODELMORA_TORCH_THREADS": "3"}), {"A": "b"})
    assert isinstance(zl, ZygoteLauncher)
    assert zl.env == {"A": "b", "OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    assert zl.fallback.preload == zl.preload


def test_registered_task_types_add_their_libraries_to_the_preload() -> None:
    from modelmora.config import load_settings
    from modelmora.server import make_launcher

    settings = load_settings(None, environ={"MODELMORA_ZYGOTE_PRELOAD": "numpy,torch"})
    assert make_launcher(settings, tasks={"txt2embed", "img2txt"}).preload == ("numpy", "torch")
    zl = make_launcher(settings, tasks={"txt2embed", "txt2img"})
    assert zl.preload == ("numpy", "torch", "diffusers") and zl.fallback.preload == zl.preload
    spawn = make_launcher(load_settings(None, environ={"MODELMORA_ZYGOTE": "false"}), tasks={"txt2img"})
    assert spawn.preload[-1] == "diffusers"
    listed = load_settings(None, environ={"MODELMORA_ZYGOTE_PRELOAD": "numpy,diffusers,torch"})
    assert make_launcher(listed, tasks={"txt2img"}).preload == ("numpy", "diffusers", "torch")  # once, in place


@pytest.mark.anyio
async def test_spawn_failure_is_a_load_failure() -> None:
    with pytest.raises(ModelLoadFailed, match="cannot start a worker process"):
        async with worker(SpawnLauncher(python="/nonexistent/python")):
            pass


class _Driver:
    """A stand-in for the CUDA driver library: cuDeviceGetCount answers `status`."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.asked: list[str] = []

    def load(self, path: str) -> _Driver:
        self.asked.append(path)
        return self

    def cuDeviceGetCount(self, count: object) -> int:
        return self.status


@pytest.mark.parametrize(("status", "initialised"), [(3, False), (0, True), (100, True)])
def test_cuda_initialised_asks_the_mapped_driver(tmp_path: Path, status: int, initialised: bool) -> None:
    """A mapped libcuda that answers CUDA_ERROR_NOT_INITIALIZED (3) is safe to fork; any other answer
    (0: initialised, 100: no device, after cuInit) is not."""
    from modelmora_workers.zygote import cuda_initialised

    maps = tmp_path / "maps"
    lib = "/usr/lib/x86_64-linux-gnu/libcuda.so.580.159.04"
    maps.write_text(f"7f00-7f01 r-xp 00000000 00:10 42 {lib}\n7f02-7f03 r--p 00000000 00:10 43 /usr/lib/libc.so.6\n")
    driver = _Driver(status)
    assert cuda_initialised(str(maps), driver.load) is initialised
    assert driver.asked == [lib]


def test_cuda_initialised_without_a_driver_or_with_one_that_cannot_be_asked(tmp_path: Path) -> None:
    from modelmora_workers.zygote import cuda_initialised

    maps = tmp_path / "maps"
    maps.write_text("7f02-7f03 r--p 00000000 00:10 43 /usr/lib/libc.so.6\n")
    assert cuda_initialised(str(maps)) is False
    maps.write_text("7f00-7f01 r-xp 00000000 00:10 42 /nonexistent/libcuda.so.1\n")
    assert cuda_initialised(str(maps)) is True  # cannot be loaded: assume the worst
    assert cuda_initialised() is False  # this machine's own process
