"""The services tests use: PostgreSQL and Redis named by MODELMORA_TEST_PG_DSN and
MODELMORA_TEST_REDIS_URL (a fresh database, or a fresh key prefix, per test; skipped when unset,
unless MODELMORA_REQUIRE_SERVICES=1), and throwaway ones (a PostgreSQL cluster, a redis-server) for
the tests that restart the service (PostgreSQL's own binaries, run as the postgres user when the
tests run as root: initdb refuses root)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

import pytest

from serverproc import free_port

PG_DSN_ENV = "MODELMORA_TEST_PG_DSN"
REDIS_URL_ENV = "MODELMORA_TEST_REDIS_URL"


def missing(reason: str) -> NoReturn:
    """Skip the test for a missing service; fail it under MODELMORA_REQUIRE_SERVICES=1."""
    if os.environ.get("MODELMORA_REQUIRE_SERVICES") == "1":
        pytest.fail(reason + "; MODELMORA_REQUIRE_SERVICES=1 forbids skipping")
    pytest.skip(reason)


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _execute(dsn: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def _admin(dsn: str, statement: str) -> None:
    """Run one statement through `dsn`, in a thread of its own (a fixture may run inside an event loop)."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: asyncio.run(_execute(dsn, statement))).result()


class PgDatabase:
    """A fresh database created through a DSN (`url`), dropped by `drop()`."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.name = f"mmtest_{uuid.uuid4().hex[:16]}"
        _admin(dsn, f'CREATE DATABASE "{self.name}"')
        self.url = _with_database(dsn, self.name)

    def drop(self) -> None:
        _admin(self.dsn, f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def fresh_database() -> PgDatabase:
    """A fresh database in the PostgreSQL MODELMORA_TEST_PG_DSN names (skipped without it)."""
    dsn = os.environ.get(PG_DSN_ENV)
    if not dsn:
        missing(f"{PG_DSN_ENV} is not set (no PostgreSQL to test against)")
    try:
        return PgDatabase(dsn)
    except OSError as exc:
        missing(f"PostgreSQL at {PG_DSN_ENV} does not answer: {exc}")


def shared_redis_url() -> str:
    """The Redis MODELMORA_TEST_REDIS_URL names, checked to answer (skipped without it)."""
    url = os.environ.get(REDIS_URL_ENV)
    if not url:
        missing(f"{REDIS_URL_ENV} is not set (no Redis to test against)")
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        missing(f"Redis at {REDIS_URL_ENV} does not answer: {exc}")
    finally:
        client.close()
    return url


def delete_keys(url: str, prefix: str) -> None:
    """Delete every key of `url`'s Redis that starts with `prefix`."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


class RedisServer:
    """A throwaway redis-server on a free port (no persistence), for the tests that restart Redis."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def start(self) -> RedisServer:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 60  # a failsafe, not a performance bound
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    assert self.proc.poll() is None, "redis-server exited"
                    assert time.monotonic() < deadline, "redis-server did not answer"
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        """Kill it (its streams are lost: no persistence) and start it again on the same port."""
        self.stop()
        self.start()


def available() -> bool:
    return shutil.which("initdb") is not None and shutil.which("pg_ctl") is not None


class PgCluster:
    """`start()` initialises and starts a cluster on a free port; `url(db)` names a database in it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mm-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> PgCluster:
        if self._as:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start")
        return self

    def restart(self) -> None:
        """Stop the cluster fast (connections are cut) and start it again."""
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-m", "fast", "-o", opts, "-l", str(self.dir / "log"), "-w", "restart"
        )

    def stop(self) -> None:
        subprocess.run([*self._as, "pg_ctl", "-D", str(self.data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def create_database(self, name: str) -> str:
        """Create database `name`; returns its URL."""
        host = ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        subprocess.run(["createdb", *host, name], check=True, capture_output=True, timeout=60)
        return self.url(name)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"
