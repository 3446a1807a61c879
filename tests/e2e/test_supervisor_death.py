"""If the supervisor dies (even by SIGKILL) its workers exit within a second, and the next
start removes the segments the dead one left. Uses the light Echo pipeline through the
`pipelines` setting, so that no model import slows it down, with workers spawned by the
supervisor or forked from a zygote (which preloads only numpy here): supervisor death ->
zygote death -> worker death, each through PR_SET_PDEATHSIG."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from modelmora.ipc import segments

from conftest import TESTS_DIR
from serverproc import ServerProcess, mm

pytestmark = pytest.mark.slow  # real server processes


def _env(zygote: bool = True) -> dict[str, str]:
    return {
        "MODELMORA_PIPELINES__TXT2EMBED": "worker_pipelines:Echo",
        "MODELMORA_ZYGOTE": str(zygote).lower(),
        "MODELMORA_ZYGOTE_PRELOAD": "numpy",
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p),
    }


def _exits_within(proc: psutil.Process, timeout_s: float) -> bool:
    """True when `proc` is gone (or a zombie: it was reparented, exited, awaits reaping)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "spawn"])
def test_sigkill_supervisor_takes_workers_down_and_restart_cleans_up(
    tmp_path: Path, echo_dir: Path, zygote: bool
) -> None:
    home = tmp_path / "home"
    mm("install", str(echo_dir), "--id", "echo", "--task", "txt2embed", home=home)
    srv = ServerProcess(home, _env(zygote)).start()
    try:
        r = httpx.post(f"{srv.url}/api/v1/infer/echo", json={"input_data": {"text": "hi"}}, timeout=60)
        assert r.status_code == 200, r.text
        status = httpx.get(f"{srv.url}/api/v1/status").json()
        worker = psutil.Process(status["models"][0]["worker"]["pid"])
        if zygote:  # supervisor -> zygote -> worker
            zygote_proc = psutil.Process(status["zygote"]["pid"])
            assert zygote_proc.ppid() == srv.pid and worker.ppid() == zygote_proc.pid
        else:
            assert status["zygote"] is None and worker.ppid() == srv.pid
        left = [n for n in segments.our_segments() if n.startswith(f"mm-{srv.pid}-")]
        assert left, "the worker's segment exists while it runs"
    finally:
        srv.stop(signal.SIGKILL)
    assert _exits_within(worker, 1.0), "the worker outlived its supervisor by more than a second"
    if zygote:
        assert _exits_within(zygote_proc, 1.0), "the zygote outlived its supervisor by more than a second"
    # SIGKILL gave the supervisor no chance to clean up; a new server removes what it left
    # (a resource tracker may also have removed them already: both are fine)
    srv2 = ServerProcess(home, _env(zygote)).start()
    try:
        assert [n for n in segments.our_segments() if n.startswith(f"mm-{srv.pid}-")] == []
        r = httpx.post(f"{srv2.url}/api/v1/infer/echo", json={"input_data": {"text": "again"}}, timeout=60)
        assert r.status_code == 200
    finally:
        assert srv2.stop() == 0
    assert [n for n in segments.our_segments() if n.startswith(f"mm-{srv2.pid}-")] == []


def test_remove_stale_spares_live_servers(tmp_path: Path) -> None:
    mine = segments.create(segments.new_instance_id(), "live", 4096)
    try:
        fake_dead = segments.SHM_DIR / "mm-999999999-abcdef-w-000000"
        fake_dead.write_bytes(b"")
        removed = segments.remove_stale()
        assert fake_dead.name in removed and not fake_dead.exists()
        assert mine.name in segments.our_segments()
    finally:
        segments.unlink(mine)


def test_preload_on_start(tmp_path: Path, echo_dir: Path) -> None:
    home = tmp_path / "home"
    mm("install", str(echo_dir), "--id", "echo", "--task", "txt2embed", home=home)
    mm("set", "echo", "--preload", home=home)
    srv = ServerProcess(home, _env()).start()
    try:
        deadline = time.monotonic() + 30
        while True:  # no request was sent: the server loads it on its own
            models = httpx.get(f"{srv.url}/api/v1/status").json()["models"]
            if models and models[0]["state"] == "ready":
                break
            assert time.monotonic() < deadline, models
            time.sleep(0.05)
        assert models[0]["served"] == 0
    finally:
        assert srv.stop() == 0
