"""`database_url` at start: a malformed URL, a database that does not answer (retried, then one
clear line naming the setting, the password hidden), and trio, which asyncpg does not run on."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelmora.jobs import redact_url
from modelmora.server import StartupError, check_backend, serve

from conftest import make_settings
from serverproc import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("url", ["mysql://db/x", "sqlite:///tmp/x", "localhost:5432"])
async def test_malformed_database_url_stops_the_start(tmp_path: Path, url: str) -> None:
    settings = make_settings(tmp_path / "home", database_url=url, port=0, grpc_port=0)
    with pytest.raises(StartupError, match="database_url must be a postgresql:// URL"):
        await serve(settings)


async def test_database_down_at_start_is_retried_then_named(tmp_path: Path) -> None:
    url = f"postgresql://mm:s3cret@127.0.0.1:{free_port()}/jobs"  # nothing listens there
    settings = make_settings(
        tmp_path / "home",
        database_url=url,
        database_connect_attempts=2,
        database_connect_retry_s=0.01,
        port=0,
        grpc_port=0,
    )
    with pytest.raises(StartupError, match=r"cannot open the job store \(database_url = ") as err:
        await serve(settings)
    assert "s3cret" not in str(err.value) and "***@127.0.0.1" in str(err.value)


def test_database_url_needs_asyncio(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "home", database_url="postgresql://db/x", grpc_port=0)
    with pytest.raises(StartupError, match=r"database_url .* asyncio"):
        check_backend(settings, "trio")
    check_backend(settings, "asyncio")


def test_redact_url() -> None:
    assert redact_url("postgresql://u:p@h:1/d") == "postgresql://***@h:1/d"
    assert redact_url("postgresql://h/d") == "postgresql://h/d"


@pytest.mark.parametrize(
    ("database_url", "redis_url", "message"),
    [
        ("", "redis://127.0.0.1:6379/0", "redis_url shares jobs between servers sharing a PostgreSQL database_url"),
        ("postgresql://db/x", "http://127.0.0.1:6379", "redis_url must be a redis:// or rediss:// URL"),
    ],
)
async def test_a_redis_url_the_server_cannot_use_stops_the_start(
    tmp_path: Path, database_url: str, redis_url: str, message: str
) -> None:
    settings = make_settings(tmp_path / "home", database_url=database_url, redis_url=redis_url, port=0, grpc_port=0)
    with pytest.raises(StartupError, match=message):
        await serve(settings)
