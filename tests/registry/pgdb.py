"""A fresh PostgreSQL database per test, through MODELMORA_TEST_PG_DSN: the `pg_registry_url` fixture
(import it by name where it is used)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest


def _unavailable(reason: str) -> None:
    """Skip, or fail where MODELMORA_REQUIRE_SERVICES=1 forbids skipping."""
    if os.environ.get("MODELMORA_REQUIRE_SERVICES") == "1":
        pytest.fail(reason + "; MODELMORA_REQUIRE_SERVICES=1 forbids skipping")
    pytest.skip(reason)


async def _admin(dsn: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
def pg_registry_url() -> Iterator[str]:
    """The URL of a database created for this test in the server of MODELMORA_TEST_PG_DSN, dropped
    afterwards (skipped when the variable is unset or the server does not answer)."""
    dsn = os.environ.get("MODELMORA_TEST_PG_DSN", "")
    if not dsn:
        _unavailable("MODELMORA_TEST_PG_DSN is not set")
    name = f"mm_registry_{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(_admin(dsn, f"CREATE DATABASE {name}"))
    except (OSError, TimeoutError) as exc:
        _unavailable(f"PostgreSQL at MODELMORA_TEST_PG_DSN does not answer: {exc}")
    parts = urlsplit(dsn)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        asyncio.run(_admin(dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
