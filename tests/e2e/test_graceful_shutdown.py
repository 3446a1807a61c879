"""SIGTERM under load, on a real `mm serve` (Echo pipeline, no torch import): readiness turns 503
first, new requests are refused (503 `shutting_down`, gRPC UNAVAILABLE), every request that was
accepted (REST, gRPC, a running async job) gets its complete response, queued jobs stay queued,
no worker process or segment is left, and the exit status is 0. A second SIGTERM stops at once.

The requests are held in the worker until the test creates a file (`__until__<path>`), so that
"in flight" is a state the test waits for, not a race against the clock."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

from modelmora.client import Client, RetryPolicy, UnavailableError
from modelmora.ipc import segments

from conftest import TESTS_DIR
from serverproc import ServerProcess, mm

pytestmark = pytest.mark.slow  # real server processes

SAFETY_NET_S = 120.0
"""Not a performance bound: a hung server fails the test instead of hanging the suite."""
REST_REQUESTS = 40
GRPC_CALLS = 4


def _env(**settings: str) -> dict[str, str]:
    return {
        "MODELMORA_PIPELINES__TXT2EMBED": "worker_pipelines:Echo",
        "MODELMORA_ZYGOTE_PRELOAD": "numpy",
        "MODELMORA_TORCH_THREADS": "1",
        "MODELMORA_JOB_CONCURRENCY": "1",
        "MODELMORA_LOG_FORMAT": "json",
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p),
        **{f"MODELMORA_{k.upper()}": v for k, v in settings.items()},
    }


def _wait_for(condition: Callable[[], bool], srv: ServerProcess, what: str) -> None:
    deadline = time.monotonic() + SAFETY_NET_S
    while not condition():
        assert time.monotonic() < deadline, f"{what}:\n{srv.log.read_text()}"
        time.sleep(0.02)


def _model(srv: ServerProcess) -> dict[str, Any]:
    models = httpx.get(f"{srv.url}/api/v1/status", timeout=30).json()["models"]
    return next(m for m in models if m["model_id"] == "echo")


def _ready_status(srv: ServerProcess) -> int | None:
    try:
        return httpx.get(f"{srv.url}/health/ready", timeout=30).status_code
    except httpx.TransportError:
        return None


def _job_statuses(home: Path) -> dict[str, str]:
    db = sqlite3.connect(home / "jobs.sqlite3")
    try:
        return dict(db.execute("SELECT id, status FROM jobs").fetchall())
    finally:
        db.close()


class _Load:
    """Requests held in the worker: REST posts, gRPC calls and a running and a queued async job."""

    def __init__(self, srv: ServerProcess, hold: str) -> None:
        self.srv = srv
        self.hold = hold
        self.rest: list[httpx.Response | BaseException | None] = [None] * REST_REQUESTS
        self.grpc: list[np.ndarray | BaseException | None] = [None] * GRPC_CALLS
        self.threads: list[threading.Thread] = []
        self.jobs: list[str] = []

    def _post(self, i: int) -> None:
        body = {"input_data": {"text": [self.hold, f"rest-{i}"]}}
        try:
            self.rest[i] = httpx.post(f"{self.srv.url}/api/v1/infer/echo", json=body, timeout=SAFETY_NET_S)
        except BaseException as exc:
            self.rest[i] = exc

    def _call(self, i: int) -> None:
        try:
            with Client(f"127.0.0.1:{self.srv.grpc_port}", retry=RetryPolicy(max_attempts=1)) as client:
                self.grpc[i] = client.embed("echo", [self.hold, f"grpc-{i}"], timeout=SAFETY_NET_S)
        except BaseException as exc:
            self.grpc[i] = exc

    def start(self) -> None:
        """The first request occupies the worker; the rest queue behind it."""
        self._spawn(self._post, 0)
        _wait_for(lambda: _model(self.srv)["busy"], self.srv, "the first request never reached the worker")
        for i in range(1, REST_REQUESTS):
            self._spawn(self._post, i)
        for i in range(GRPC_CALLS):
            self._spawn(self._call, i)
        for _ in range(2):  # job_concurrency = 1: the first runs (its request queues), the second waits
            body = {"input_data": {"text": [self.hold, "job"]}}
            r = httpx.post(f"{self.srv.url}/api/v1/infer/echo/async", json=body, timeout=30)
            assert r.status_code == 202, r.text
            self.jobs.append(r.json()["job_id"])
        queued = REST_REQUESTS - 1 + GRPC_CALLS + 1
        _wait_for(lambda: _model(self.srv)["queue_depth"] == queued, self.srv, "the requests never all queued")

    def _spawn(self, target: Callable[[int], None], i: int) -> None:
        thread = threading.Thread(target=target, args=(i,), daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(SAFETY_NET_S)
            assert not thread.is_alive(), "a request never ended"


def _start(tmp_path: Path, echo_dir: Path, **settings: str) -> tuple[ServerProcess, dict[str, Any]]:
    home = tmp_path / "home"
    mm("install", str(echo_dir), "--id", "echo", "--task", "txt2embed", home=home)
    srv = ServerProcess(home, _env(**settings)).start()
    r = httpx.post(f"{srv.url}/api/v1/infer/echo", json={"input_data": {"text": "warm"}}, timeout=60)
    assert r.status_code == 200, r.text
    status = httpx.get(f"{srv.url}/api/v1/status", timeout=30).json()
    return srv, status


def _assert_nothing_left(srv: ServerProcess, status: dict[str, Any]) -> None:
    assert [n for n in segments.our_segments() if n.startswith(f"mm-{srv.pid}-")] == []
    pids = [status["models"][0]["worker"]["pid"]]
    if status["zygote"] is not None:
        pids.append(status["zygote"]["pid"])
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid


def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(tmp_path: Path, echo_dir: Path) -> None:
    srv, status = _start(tmp_path, echo_dir, shutdown_grace_s="3600")
    gate = tmp_path / "release"
    load = _Load(srv, f"__until__{gate}")
    try:
        load.start()
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        # readiness turns 503 while the accepted requests are still held in the worker
        _wait_for(lambda: _ready_status(srv) == 503, srv, "readiness never turned 503")
        ready = httpx.get(f"{srv.url}/health/ready", timeout=30)
        assert ready.json() == {"status": "unavailable", "reason": "the server is shutting down"}
        assert httpx.get(f"{srv.url}/health/live", timeout=30).status_code == 200
        late = httpx.post(f"{srv.url}/api/v1/infer/echo", json={"input_data": {"text": "late"}}, timeout=30)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down", late.text
        assert late.headers["retry-after"] == "1"
        client = Client(f"127.0.0.1:{srv.grpc_port}", retry=RetryPolicy(max_attempts=1))
        with client, pytest.raises(UnavailableError, match="shutting down"):
            client.embed("echo", ["late"], timeout=30)
        assert srv.proc.poll() is None and all(r is None for r in load.rest), "the drain did not wait"
        gate.touch()
        load.join()
        assert srv.proc.wait(SAFETY_NET_S) == 0
    finally:
        gate.touch()
        srv.stop(signal.SIGKILL)
    for i, r in enumerate(load.rest):
        assert isinstance(r, httpx.Response) and r.status_code == 200, r
        rows = r.json()["output"]["embeddings"]
        text = f"rest-{i}"
        assert len(rows) == 2 and rows[1][:2] == [float(len(text)), float(sum(map(ord, text)))]
    for i, result in enumerate(load.grpc):
        assert isinstance(result, np.ndarray), result
        text = f"grpc-{i}"
        assert result.shape == (2, 4) and result[1, 0] == len(text)
    running, queued = load.jobs
    assert _job_statuses(srv.home) == {running: "completed", queued: "queued"}
    _assert_nothing_left(srv, status)
    log = srv.log.read_text()
    assert '"event": "draining"' in log and '"event": "drained"' in log and "shutdown_forced" not in log
    assert "Traceback" not in log


def test_a_second_sigterm_stops_at_once(tmp_path: Path, echo_dir: Path) -> None:
    """With a grace and a worker stop grace of an hour, only the second SIGTERM can end the
    server while its requests are held: it exits 0, leaves no worker or segment, and the job
    that was running is back in the queue."""
    srv, status = _start(tmp_path, echo_dir, shutdown_grace_s="3600", worker_stop_grace_s="3600")
    gate = tmp_path / "never"
    load = _Load(srv, f"__until__{gate}")
    try:
        load.start()
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: _ready_status(srv) == 503, srv, "readiness never turned 503")
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(SAFETY_NET_S) == 0
        load.join()
    finally:
        srv.stop(signal.SIGKILL)
    answered = [(r.status_code, r.text) for r in load.rest if isinstance(r, httpx.Response)]
    assert all(code == 503 for code, _ in answered), answered
    assert _job_statuses(srv.home) == dict.fromkeys(load.jobs, "queued")
    _assert_nothing_left(srv, status)
    log = srv.log.read_text()
    assert "shutdown_forced" in log and "a second SIGTERM" in log and "Traceback" not in log
