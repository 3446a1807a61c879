"""The supervisor's root: one task group owning the scheduler (and so every worker), the HTTP
listener (`httpserver`: Hypercorn's HTTP/1.1 and HTTP/2 cleartext on one port, behind our accept
loop with its connection cap) and the gRPC listener (`api.grpc`, on `grpc_port`), both over the one
inference core, inside the zygote's owner (`ZygoteLauncher.running`), which so outlives every worker
it forked. Runs on asyncio by default, on trio with `backend = "trio"` (without gRPC: grpclib is
asyncio only). A failure to start is one `StartupError` line (`mm serve` exits 2), a /dev/shm too
small for the rings included (`shm`). SIGTERM or SIGINT drains and stops (`shutdown`)."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import resource
import socket
import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread
import structlog
from hypercorn.config import Config as HypercornConfig

from .api import create_app, job_result_body
from .config import ConfigError, Settings
from .errors import StorageUnavailable
from .httpserver import HttpListener, current_backend
from .ipc import segments
from .jobs import JobRunner, JobStore, open_job_store, redact_url
from .lifecycle import SpawnLauncher, ZygoteLauncher, worker_environment
from .observability import ExportUnavailable, Spans, open_otlp, worker_log_env
from .registry import FileVerifier, ModelStore, open_store
from .results import open_result_store
from .scheduler import Scheduler
from .security import Gate, Reloadable, ServerTls, TlsError, TokenError, check_exposure, follow_files
from .service import InferenceService
from .shm import ShmShortage, check_store_shm
from .shutdown import Shutdown, drain, kill_workers_when_forced
from .tasks import task_info

if TYPE_CHECKING:
    from .api.grpc import GrpcListener

__all__ = (
    "StartupError",
    "bind_socket",
    "check_backend",
    "connection_limit",
    "make_launcher",
    "preload_for",
    "raise_fd_limit",
    "run",
    "serve",
)

log = structlog.get_logger("modelmora.server")


class StartupError(Exception):
    """The server cannot start: address in use, home not writable, a setting the backend cannot
    serve... The message is one line for the operator (`mm serve` prints it and exits 2)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one), close-on-exec: no worker or zygote holds it.

    Raises:
        StartupError: the address cannot be bound (in use, not local, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except (OSError, OverflowError) as exc:
        sock.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise StartupError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


FD_RESERVE = 256
"""File descriptors kept beside client connections: the registry, rings and segments, worker
sockets and pipes, result files, image URL fetches."""


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # e.g. above fs.nr_open: keep the soft limit
            pass
    return soft


def connection_limit(settings: Settings) -> int:
    """`max_connections`, lowered to leave `FD_RESERVE` descriptors of the soft limit (at least half
    of it) to everything else."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return settings.max_connections
    room = max(soft - FD_RESERVE, soft // 2, 1)
    if settings.max_connections > room:
        log.warning("max_connections_lowered", max_connections=settings.max_connections, to=room, open_files_limit=soft)
    return min(settings.max_connections, room)


def _worker_env(settings: Settings, worker_env: Mapping[str, str] | None) -> dict[str, str]:
    """Workers log as we do (format and level, from their environment); with JSON logs they draw
    no progress bars."""
    env = {
        **(os.environ if worker_env is None else worker_env),
        **worker_log_env(settings.log_level, settings.log_format),
    }
    if env.get("MODELMORA_LOG_FORMAT") == "json":
        env.update(TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    return env


def check_backend(settings: Settings, backend: str) -> None:
    """Refuse settings that need asyncio on trio.

    Raises:
        StartupError: a setting names an adapter that runs only on asyncio.
    """
    if backend == "trio" and settings.effective_grpc_port(backend):
        raise StartupError(
            f"gRPC (grpc_port = {settings.grpc_port}) runs only on the asyncio backend: set grpc_port = 0 "
            "(MODELMORA_GRPC_PORT=0, mm serve --grpc-port 0) to serve REST alone on trio, or backend = 'asyncio'"
        )
    if backend == "trio" and settings.database_url:
        raise StartupError(
            "database_url (PostgreSQL, asyncpg) runs only on the asyncio backend: set backend = 'asyncio', or leave"
            " database_url empty for the SQLite job store"
        )
    if backend == "trio" and settings.result_store == "s3":
        raise StartupError(
            "result_store = 's3' runs only on the asyncio backend: set backend = 'asyncio' "
            "(or mm serve --backend asyncio), or another result_store"
        )


def _edge_security(settings: Settings) -> tuple[Gate, ServerTls | None]:
    """The gate (tokens) and the TLS contexts the settings ask for.

    Raises:
        StartupError: a tokens entry or file, or a TLS file, cannot be loaded (one line naming it).
    """
    try:
        gate = Gate(settings.auth)
        tls = ServerTls(settings.tls) if settings.tls.enabled else None
    except (TokenError, TlsError) as exc:
        raise StartupError(str(exc)) from None
    return gate, tls


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


async def serve(
    settings: Settings,
    *,
    sock: socket.socket | None = None,
    grpc_sock: socket.socket | None = None,
    stop: anyio.Event | None = None,
    worker_env: dict[str, str] | None = None,
    pipelines: dict[str, str] | None = None,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until `stop` is set (or SIGINT/SIGTERM); reports the bound HTTP port.

    `sock` and `grpc_sock` are listening sockets to serve on instead of binding `port` and the
    effective gRPC port (`grpc_sock` is used only where gRPC is on)."""
    removed = segments.remove_stale()
    if removed:
        log.info("removed_stale_segments", count=len(removed))
    check_backend(settings, current_backend())
    gate, tls = _edge_security(settings)
    home = settings.home_path
    try:
        home.mkdir(parents=True, exist_ok=True)
        attempts, retry_s = settings.database_connect_attempts, settings.database_connect_retry_s
        store = await anyio.to_thread.run_sync(
            lambda: open_store(settings.registry_url, home, connect_attempts=attempts, connect_retry_s=retry_s)
        )
    except StorageUnavailable as exc:  # PostgreSQL: the message names the URL without credentials
        raise StartupError(exc.message) from None
    except (OSError, sqlite3.Error, ValueError, ConfigError) as exc:
        where = redact_url(settings.registry_url) if settings.registry_url else str(home)
        raise StartupError(f"cannot open the registry {where}: {_reason(exc)}") from None
    grpc_port = settings.effective_grpc_port(current_backend())
    try:
        try:
            await check_store_shm(settings, store)
        except ShmShortage as exc:
            raise StartupError(str(exc)) from None
        sock = sock or bind_socket(settings.host, settings.port)
        if grpc_port and grpc_sock is None:
            grpc_sock = bind_socket(settings.host, grpc_port)
    except StartupError:
        store.close()
        if sock is not None:
            sock.close()
        raise
    if not grpc_port:
        grpc_sock = None
    try:
        env = _worker_env(settings, worker_env)
        await _serve(settings, store, sock, grpc_sock, stop, env, pipelines, task_status, gate=gate, tls=tls)
    finally:
        store.close()
        for listening in (sock, grpc_sock):
            if listening is not None:
                with contextlib.suppress(OSError):
                    listening.close()


async def _serve(
    settings: Settings,
    store: ModelStore,
    sock: socket.socket,
    grpc_sock: socket.socket | None,
    stop: anyio.Event | None,
    worker_env: dict[str, str] | None,
    pipelines: dict[str, str] | None,
    task_status: anyio.abc.TaskStatus[int],
    *,
    gate: Gate,
    tls: ServerTls | None,
) -> None:
    home = settings.home_path
    instance_id = segments.new_instance_id()
    launcher = make_launcher(settings, worker_env, {rec.task for rec in await store.alist()})
    scheduler = Scheduler(
        settings,
        instance_id,
        pipelines=pipelines,
        worker_env=worker_env,
        launcher=launcher,
        verifier=FileVerifier.under(home),  # what was verified survives restarts
    )
    port = sock.getsockname()[1]
    config = HypercornConfig()
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = settings.shutdown_grace_s
    config.keep_alive_timeout = settings.keep_alive_timeout_s
    config.ssl_handshake_timeout = settings.tls.handshake_timeout_s
    limit = connection_limit(settings)
    shutdown = Shutdown(settings.shutdown_grace_s, stop)
    async with contextlib.AsyncExitStack() as stack:
        try:
            results = await stack.enter_async_context(open_result_store(settings))
        except OSError as exc:
            raise StartupError(f"cannot open the result store under {home}: {_reason(exc)}") from None
        jobs = await stack.enter_async_context(_job_store(settings))
        spans = await stack.enter_async_context(_span_export(settings.otlp_endpoint))
        await stack.enter_async_context(_owned(launcher))
        watch = await stack.enter_async_context(anyio.create_task_group())  # until the workers are gone
        stack.callback(watch.cancel_scope.cancel)
        watch.start_soon(shutdown.watch)
        tg = await stack.enter_async_context(anyio.create_task_group())
        service = InferenceService(settings, store, scheduler, results)
        service.record.spans = spans
        runner = JobRunner(settings, jobs, service, job_result_body)
        app = create_app(service, gate, jobs=runner)
        listener = HttpListener(app, config, sock, limit=limit, ssl=tls.http if tls is not None else None)
        grpc = _grpc_listener(service, grpc_sock, port, gate, tls, runner) if grpc_sock is not None else None
        await tg.start(scheduler.run)
        await service.preload()  # starts the loads; requests are accepted meanwhile
        background = anyio.CancelScope()  # tasks that end with the HTTP server
        reloadable: list[Reloadable] = [r for r in (gate, tls) if r is not None and r.watched_paths()]
        tg.start_soon(_background, background, service.run, runner.run, _follow(reloadable))
        warning = check_exposure(settings, tls=tls is not None, auth=gate.enabled)
        if warning is not None:
            event, _, advice = warning.partition(": ")
            log.warning(event, host=settings.host, advice=advice)
        log.info(
            "listening",
            url=f"{'https' if tls is not None else 'http'}://{settings.host}:{port}",
            home=str(home),
            instance=instance_id,
            backend=current_backend(),
            max_connections=listener.limit,
            grpc=f"{settings.host}:{grpc.port}" if grpc is not None else None,
            tls=("mutual" if tls.mutual else "on") if tls is not None else "off",
            auth=f"{len(gate.table)} tokens" if gate.enabled else "off",
        )
        task_status.started(port)
        # In a task group of its own: the connections' tasks end before the scheduler stops.
        async with anyio.create_task_group() as edges:
            cut = anyio.Event()
            if grpc is not None:
                await edges.start(functools.partial(grpc.serve, shutdown.draining.wait, forced=cut.wait), name="grpc")
            serve_http = functools.partial(listener.serve, shutdown.draining.wait, closing=cut.wait, forced=cut.wait)
            edges.start_soon(serve_http, name="http")

            def stop_now() -> None:
                background.cancel()
                scheduler.close()

            await drain(shutdown, listener, grpc, runner, stop_now=stop_now, cut=cut)
        log.info("stopping", **listener.statistics())
        background.cancel()
        scheduler.close()
        watch.start_soon(kill_workers_when_forced, shutdown, scheduler)


def _grpc_listener(
    service: InferenceService,
    sock: socket.socket,
    http_port: int,
    gate: Gate,
    tls: ServerTls | None,
    jobs: JobRunner | None = None,
) -> GrpcListener:
    """The gRPC listener (imported here: grpclib loads only where gRPC is served). Stored result URLs
    in its answers point at the HTTP port (or `public_url`)."""
    from .api.grpc import GrpcListener

    settings = service.settings
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else socket.gethostname()
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if tls is not None else "http"
    base_url = settings.public_url.rstrip("/") + "/" if settings.public_url else f"{scheme}://{host}:{http_port}/"
    return GrpcListener(service, sock, base_url, gate=gate, ssl=tls.grpc if tls is not None else None, jobs=jobs)


def _follow(targets: list[Reloadable]) -> Callable[[], Coroutine[Any, Any, None]]:
    """The task reloading the tokens file and TLS files when they change, and on SIGHUP."""

    async def follow() -> None:
        await follow_files(targets)

    return follow


GC_YOUNG_THRESHOLD = 10_000
"""Allocations between collections of the youngest generation (Python's default: 700)."""


def _tune_gc() -> None:
    """What was imported and configured before serving is never garbage: it leaves the collector's
    generations (`gc.freeze`), so collections while serving skip it. The youngest generation is
    collected after 10,000 allocations instead of 700: most of a request's objects are freed by
    reference counting before a collection would look at them, and with 64 requests in flight each
    collection traverses their live objects (about 13 us of supervisor CPU per request saved
    with a queue of 64 waiting requests)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


@contextlib.asynccontextmanager
async def _job_store(settings: Settings) -> AsyncIterator[JobStore]:
    """The job store (`database_url`), as a start-up error naming the setting when it cannot open.

    Raises:
        StartupError: a malformed `database_url`, or a database that stays unreachable.
    """
    where = redact_url(settings.database_url) if settings.database_url else str(settings.home_path)
    try:
        opened = open_job_store(settings, settings.home_path)
        jobs = await opened.__aenter__()
    except ConfigError as exc:
        raise StartupError(str(exc)) from None
    except Exception as exc:
        raise StartupError(f"cannot open the job store (database_url = {where!r}): {_reason(exc)}") from None
    try:
        yield jobs
    finally:
        await opened.__aexit__(None, None, None)


@contextlib.asynccontextmanager
async def _span_export(endpoint: str) -> AsyncIterator[Spans | None]:
    """Request spans exported to `endpoint` over OTLP (None when empty); flushed at the end.

    Raises:
        StartupError: the OpenTelemetry SDK or its OTLP exporter is not installed.
    """
    if not endpoint:
        yield None
        return
    try:
        spans = open_otlp(endpoint)
    except ExportUnavailable as exc:
        raise StartupError(str(exc)) from None
    log.info("exporting_spans", endpoint=endpoint)
    try:
        yield spans
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(spans.close)


def _reason(exc: BaseException) -> str:
    """An OS or SQLite error in a few words (`Read-only file system: '/x/result_secret'`)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {str(exc.filename)!r}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


async def _background(scope: anyio.CancelScope, *tasks: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `tasks` until `scope` is cancelled."""
    with scope:
        async with anyio.create_task_group() as tg:
            for task in tasks:
                tg.start_soon(task)


def run(settings: Settings, *, backend: str | None = None) -> None:
    """Blocking entry point used by `mm serve`: raises the open-files limit, then serves on
    `backend` (default: the `backend` setting).

    Raises:
        StartupError: the server could not start (one line for the operator).
    """
    backend = backend or settings.backend
    check_backend(settings, backend)
    raise_fd_limit()
    _tune_gc()
    options: dict[str, Any] = {}
    if backend == "asyncio":
        try:
            import uvloop  # noqa: F401
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
            pass
        else:
            options["use_uvloop"] = True
    try:
        anyio.run(serve, settings, backend=backend, backend_options=options)
    except BaseExceptionGroup as group:
        startup = group.subgroup(StartupError)
        if startup is None:
            raise
        first: BaseException = startup
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
