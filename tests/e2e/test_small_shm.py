"""A real `mm serve` with a small /dev/shm of its own (a private mount namespace with a small
tmpfs): rings that cannot fit refuse the start in one line (the defaults in a container's 64 MiB
included), a worker whose rings find no room fails its load only, and a request whose payload
finds no room gets 503 while the server and its worker keep serving (issue 12: a full /dev/shm
used to kill the supervisor with SIGBUS)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import private_shm
import pytest

import serverproc
from conftest import TESTS_DIR
from serverproc import ServerProcess, free_port, mm

pytestmark = pytest.mark.slow  # real server processes


def _env(**settings: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")},
        "MODELMORA_PIPELINES__TXT2EMBED": "worker_pipelines:Echo",
        "MODELMORA_ZYGOTE_PRELOAD": "numpy",
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p),
        "COLUMNS": "1000",  # one line, however long
        **{f"MODELMORA_{k.upper()}": v for k, v in settings.items()},
    }


def _serve_with_small_shm(size: str, tmp_path: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    prefix = private_shm.command_or_skip(size)
    env = {**_env(**settings), "MODELMORA_HOME": str(tmp_path / "home")}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "modelmora", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_default_rings_refuse_a_container_s_64m_shm_in_one_line(tmp_path: Path) -> None:
    """The default rings of two workers (a model and its reload's new one) need 64 MiB and two
    pages: a container's default /dev/shm is refused, with the remedies."""
    proc = _serve_with_small_shm("64m", tmp_path)
    assert proc.returncode == 2, proc.stderr  # start-up failures exit 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("error: /dev/shm has 64.0 MiB free (67108864 bytes, of 64.0 MiB)"), line
    assert "needs 64.0 MiB (67117056 bytes): the shared-memory rings of 2 workers" in line
    assert "request_ring_mb = 16 + response_ring_mb = 16 MiB" in line
    assert "--shm-size=128m" in line and "emptyDir with medium: Memory and sizeLimit: 128Mi" in line
    assert "Traceback" not in proc.stdout + proc.stderr


def test_rings_larger_than_shm_refuse_to_start_in_one_line(tmp_path: Path) -> None:
    proc = _serve_with_small_shm("16m", tmp_path, request_ring_mb="8", response_ring_mb="8")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: /dev/shm has 16.0 MiB free"), lines[0]
    assert "request_ring_mb = 8 + response_ring_mb = 8 MiB" in lines[0] and "--shm-size=64m" in lines[0]


def test_a_shm_with_room_for_the_rings_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 x (1 + 1 MiB) of rings in a 5 MiB /dev/shm: the server starts, and stops with exit 0."""
    prefix = private_shm.command_or_skip("5m")
    command = serverproc._mm_command()
    monkeypatch.setattr(serverproc, "_mm_command", lambda: [*prefix, *command])
    srv = ServerProcess(tmp_path / "home", _env(request_ring_mb="1", response_ring_mb="1")).start()
    assert srv.stop() == 0


LARGE = ["x" * 90_000] * 150  # 13.5 MB of input: more than the whole 12 MiB /dev/shm
MEDIUM = ["y" * 90_000] * 30  # 2.7 MB: more than the 1 MiB ring, room for its segment


def test_a_payload_without_room_gets_503_and_the_server_keeps_serving(
    tmp_path: Path, echo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = private_shm.command_or_skip("12m")
    command = serverproc._mm_command()
    monkeypatch.setattr(serverproc, "_mm_command", lambda: [*prefix, *command])
    home = tmp_path / "home"
    mm("install", str(echo_dir), "--id", "echo", "--task", "txt2embed", home=home)
    srv = ServerProcess(home, _env(request_ring_mb="1", response_ring_mb="1")).start()
    try:
        url = f"{srv.url}/api/v1/infer/echo"
        r = httpx.post(url, json={"input_data": {"text": "warm"}}, timeout=60)
        assert r.status_code == 200, r.text
        pid = httpx.get(f"{srv.url}/api/v1/status").json()["models"][0]["worker"]["pid"]

        r = httpx.post(url, json={"input_data": {"text": LARGE}}, timeout=60)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "shared_memory_exhausted"
        assert r.headers["retry-after"] == "1"

        r = httpx.post(url, json={"input_data": {"text": "small"}}, timeout=60)
        assert r.status_code == 200, r.text
        r = httpx.post(url, json={"input_data": {"text": MEDIUM}}, timeout=60)
        assert r.status_code == 200, r.text
        assert [row[0] for row in r.json()["output"]["embeddings"]] == [90_000.0] * 30
        model = httpx.get(f"{srv.url}/api/v1/status").json()["models"][0]
        assert model["state"] == "ready" and model["worker"]["pid"] == pid
    finally:
        assert srv.stop() == 0
    log = srv.log.read_text()
    assert "shared_memory_exhausted" in log and "Traceback" not in log


def test_a_third_worker_without_room_for_its_rings_fails_its_load_only(
    tmp_path: Path, echo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 MiB /dev/shm, 8 MiB of rings per worker: room for two workers at start, so the server
    starts; the third model's load fails with 503 `model_load_failed` naming /dev/shm, and the
    first two keep serving."""
    prefix = private_shm.command_or_skip("24m")
    command = serverproc._mm_command()
    monkeypatch.setattr(serverproc, "_mm_command", lambda: [*prefix, *command])
    home = tmp_path / "home"
    for model in ("echo", "other", "third"):
        mm("install", str(echo_dir), "--id", model, "--task", "txt2embed", home=home)
    srv = ServerProcess(home, _env(request_ring_mb="4", response_ring_mb="4", keep_alive="-1")).start()
    try:
        for model in ("echo", "other"):
            r = httpx.post(f"{srv.url}/api/v1/infer/{model}", json={"input_data": {"text": "one"}}, timeout=60)
            assert r.status_code == 200, r.text
        r = httpx.post(f"{srv.url}/api/v1/infer/third", json={"input_data": {"text": "two"}}, timeout=60)
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "model_load_failed" and "/dev/shm" in error["message"]
        r = httpx.post(f"{srv.url}/api/v1/infer/echo", json={"input_data": {"text": "three"}}, timeout=60)
        assert r.status_code == 200, r.text
        states = {m["model_id"]: m["state"] for m in httpx.get(f"{srv.url}/api/v1/status").json()["models"]}
        assert states == {"echo": "ready", "other": "ready", "third": "failed"}
    finally:
        assert srv.stop() == 0
