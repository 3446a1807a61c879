"""The supervisor's root: one task group owning the scheduler (and so every worker) and the
HTTP server (Hypercorn: HTTP/1.1 and HTTP/2 cleartext on one port), inside the zygote's
owner (`ZygoteLauncher.running`), which so outlives every worker it forked. Runs on asyncio
in production; the same code runs on trio."""

from __future__ import annotations

import contextlib
import functools
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import anyio.abc
import structlog
from hypercorn.config import Config as HypercornConfig

from .api import create_app
from .config import ConfigError, Settings
from .ipc import segments
from .lifecycle import SpawnLauncher, ZygoteLauncher, worker_environment
from .registry import open_store
from .results import open_result_store
from .scheduler import Scheduler
from .service import InferenceService
from .tasks import task_info

__all__ = ("bind_socket", "make_launcher", "run", "serve")

log = structlog.get_logger("modelmora.server")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def preload_for(settings: Settings, tasks: Iterable[str] = ()) -> tuple[str, ...]:
    """`zygote_preload`, then the libraries of the registered models' task types (`TaskInfo.preload`:
    too heavy to import for every server, e.g. diffusers costs ~2.5 s and ~27 MB)."""
    infos = (task_info(task) for task in sorted(set(tasks)))
    extra = (module for info in infos if info is not None for module in info.preload)
    return tuple(dict.fromkeys((*settings.zygote_preload, *extra)))


def make_launcher(
    settings: Settings, worker_env: Mapping[str, str] | None = None, tasks: Iterable[str] = ()
) -> SpawnLauncher | ZygoteLauncher:
    """How workers start: forked from a zygote (`zygote = true`), else spawned.

    The zygote's environment is the one every worker would be spawned with (`worker_env`,
    default ours, plus the thread counts); both import `preload_for(settings, tasks)` before a
    pipeline, `tasks` being those of the registered models.
    """
    preload = preload_for(settings, tasks)
    if not settings.zygote:
        return SpawnLauncher(preload=preload)
    return ZygoteLauncher(
        env=worker_environment(worker_env, settings.effective_torch_threads),
        preload=preload,
        ready_timeout_s=settings.worker_start_timeout_s,
        stop_grace_s=settings.worker_stop_grace_s,
    )


def _owned(launcher: SpawnLauncher | ZygoteLauncher) -> AbstractAsyncContextManager[object]:
    return launcher.running() if isinstance(launcher, ZygoteLauncher) else contextlib.nullcontext()


def _on_asyncio() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _hypercorn(app: Any, config: HypercornConfig, shutdown: Callable[[], Awaitable[None]]) -> None:
    if not _on_asyncio():
        from hypercorn.trio import serve as trio_serve

        await trio_serve(app, config, shutdown_trigger=shutdown)
    else:
        from hypercorn.asyncio import serve as asyncio_serve

        await asyncio_serve(app, config, shutdown_trigger=shutdown)


async def serve(
    settings: Settings,
    *,
    sock: socket.socket | None = None,
    stop: anyio.Event | None = None,
    worker_env: dict[str, str] | None = None,
    pipelines: dict[str, str] | None = None,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until `stop` is set (or SIGINT/SIGTERM); reports the bound port."""
    removed = segments.remove_stale()
    if removed:
        log.info("removed_stale_segments", count=len(removed))
    try:
        segments.ensure_ring_room(settings.request_ring_mb, settings.response_ring_mb)
    except segments.SharedMemoryExhausted as exc:
        raise ConfigError(str(exc)) from exc  # `mm serve` prints it as one line
    home = settings.home_path
    home.mkdir(parents=True, exist_ok=True)
    store = open_store(settings.registry_url, home)
    instance_id = segments.new_instance_id()
    launcher = make_launcher(settings, worker_env, {rec.task for rec in await store.alist()})
    scheduler = Scheduler(settings, instance_id, pipelines=pipelines, worker_env=worker_env, launcher=launcher)
    sock = sock or bind_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    config = HypercornConfig()
    config.bind = [f"fd://{sock.fileno()}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = settings.shutdown_grace_s
    config.keep_alive_timeout = 75
    stop = stop or anyio.Event()
    try:
        async with _owned(launcher), open_result_store(settings) as results, anyio.create_task_group() as tg:
            service = InferenceService(settings, store, scheduler, results)
            app = create_app(service)
            await tg.start(scheduler.run)
            await service.preload()  # starts the loads; requests are accepted meanwhile
            background = anyio.CancelScope()  # tasks that end with the HTTP server
            tg.start_soon(_background, background, functools.partial(_signals, stop), service.run)
            log.info("listening", url=f"http://{settings.host}:{port}", home=str(home), instance=instance_id)
            task_status.started(port)
            # In a task of its own: on asyncio, Hypercorn's shutdown (an asyncio.TaskGroup
            # aborted by its ShutdownError, Python 3.11) can leave a cancel request on the
            # task that ran it, which would then leak out of the zygote owner's cancel scope.
            async with anyio.create_task_group() as http:
                http.start_soon(_hypercorn, app, config, stop.wait, name="http")
            log.info("stopping")
            background.cancel()
            scheduler.close()
    finally:
        store.close()
        with contextlib.suppress(OSError):
            sock.close()


async def _background(scope: anyio.CancelScope, *tasks: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `tasks` until `scope` is cancelled."""
    with scope:
        async with anyio.create_task_group() as tg:
            for task in tasks:
                tg.start_soon(task)


async def _signals(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stop.set()
            return


def run(settings: Settings, *, backend: str = "asyncio") -> None:
    """Blocking entry point used by `mm serve`."""
    options: dict[str, Any] = {}
    if backend == "asyncio":
        try:
            import uvloop  # noqa: F401
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
            pass
        else:
            options["use_uvloop"] = True
    anyio.run(serve, settings, backend=backend, backend_options=options)
