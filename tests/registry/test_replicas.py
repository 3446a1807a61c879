"""Two servers sharing one registry in PostgreSQL (`registry_url`): a model installed by the CLI
is listed by both; a version activated through one is the active one on the other."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pgdb import pg_registry_url

from modelmora.registry import install, open_store

from serverproc import ServerProcess

__all__ = ("pg_registry_url",)  # fixtures, used by name


@pytest.fixture
def replicas(pg_registry_url: str, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    env = {
        "MODELMORA_REGISTRY_URL": pg_registry_url,
        "MODELMORA_TORCH_THREADS": "1",
        "MODELMORA_GRPC_PORT": "0",
        "MODELMORA_ZYGOTE": "false",  # no model is loaded: nothing to import ahead
    }
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}, **env}
    servers = [ServerProcess(tmp_path / f"home-{i}", env) for i in range(2)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            if server.proc is not None:
                server.stop()


def eventually(check: Callable[[], Any], what: str) -> Any:
    """`check()` once it is truthy (a failsafe of two minutes)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if got := check():
            return got
        time.sleep(0.2)
    raise AssertionError(f"never: {what}")


def test_two_servers_share_one_registry(
    replicas: list[ServerProcess], pg_registry_url: str, tmp_path: Path, echo_dir: Path
) -> None:
    home = tmp_path / "cli-home"
    store = open_store(pg_registry_url, home)
    try:
        install(store, home, str(echo_dir), model_id="echo", task="txt2embed", check_files=False)
        for server in replicas:
            eventually(lambda s=server: httpx.get(f"{s.url}/health/ready").status_code == 200, f"{server.url} ready")
            eventually(
                lambda s=server: [m["id"] for m in httpx.get(f"{s.url}/api/v1/models").json()["models"]] == ["echo"],
                f"{server.url} lists echo",
            )
        install(store, home, str(echo_dir), model_id="echo", task="txt2embed", version="1.1.0", check_files=False)
        one, two = replicas
        r = httpx.post(f"{one.url}/api/v1/models/echo/versions/1.1.0", timeout=60)
        assert r.status_code == 200, r.text
        got = httpx.get(f"{two.url}/api/v1/models/echo").json()
        assert got["active_version"] == "1.1.0"
        assert [v["version"] for v in got["versions"]] == ["1.0.0", "1.1.0"]
        rec = store.get("echo")
        assert rec is not None and rec.active_version == "1.1.0"
    finally:
        store.close()
