"""A client that closes its connection while its request is queued: the request leaves the
queue and never runs (real Hypercorn server, real worker with the Echo pipeline)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import TESTS_DIR
from serverproc import ServerProcess, mm
from worker_pipelines import steps_run

pytestmark = pytest.mark.slow  # real server processes


def start_server(home: Path, echo_dir: Path, model_id: str, task: str, pipeline: str, **env: str) -> ServerProcess:
    """`mm serve` with one model served by a light test pipeline (tests/worker_pipelines.py)."""
    mm("install", str(echo_dir), "--id", model_id, "--task", task, home=home)
    env[f"MODELMORA_PIPELINES__{task.upper()}"] = pipeline
    env["MODELMORA_ZYGOTE_PRELOAD"] = "numpy"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return ServerProcess(home, env).start()


def test_disconnect_cancels_the_queued_request(tmp_path: Path, echo_dir: Path) -> None:
    srv = start_server(
        tmp_path / "home", echo_dir, "echo", "txt2embed", "worker_pipelines:Echo", MODELMORA_MAX_BATCH_SIZE="1"
    )
    try:
        url = f"{srv.url}/api/v1/infer/echo"
        assert httpx.post(url, json={"input_data": {"text": "warm"}}, timeout=60).status_code == 200
        busy = threading.Thread(
            target=httpx.post, args=(url,), kwargs={"json": {"input_data": {"text": "__sleep__1.0"}}, "timeout": 60}
        )
        busy.start()
        time.sleep(0.2)
        body = json.dumps({"input_data": {"text": "never runs"}}).encode()
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.sendall(
                b"POST /api/v1/infer/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            deadline = time.monotonic() + 10
            while httpx.get(f"{srv.url}/api/v1/status").json()["models"][0]["queue_depth"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        # the connection is closed: the request leaves the queue before the worker is free
        deadline = time.monotonic() + 10
        while True:
            model = httpx.get(f"{srv.url}/api/v1/status").json()["models"][0]
            if model["cancelled"] == 1:
                break
            assert time.monotonic() < deadline, model
            time.sleep(0.01)
        assert model["queue_depth"] == 0
        busy.join(30)
        served = httpx.get(f"{srv.url}/api/v1/status").json()["models"][0]["served"]
        assert served == 2  # "warm" and the sleeper: the disconnected request never ran
    finally:
        assert srv.stop() == 0


def test_closing_a_stream_stops_the_generation(tmp_path: Path, echo_dir: Path) -> None:
    """An SSE client that goes away mid-generation: the batch is cancelled in the worker within a step."""
    srv = start_server(tmp_path / "home", echo_dir, "shout", "txt2txt", "worker_pipelines:Shout")
    try:
        url = f"{srv.url}/api/v1/infer/shout"
        body = {"input_data": {"text": "__slow__0.1 " + "x" * 200}, "stream": True}
        with httpx.stream("POST", url, json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = [next(lines) for _ in range(4)]  # two token events arrived: the generation runs
        assert first[0] == "event: token" and first[1].startswith("data: ")
        t0 = time.monotonic()
        deadline = t0 + 10
        while (model := httpx.get(f"{srv.url}/api/v1/status").json()["models"][0])["cancelled"] < 1:
            assert time.monotonic() < deadline, model
            time.sleep(0.01)
        # the worker stopped at a step, not at the 64th token (one batch at a time: "ok" runs after it)
        r2 = httpx.post(url, json={"input_data": {"text": "ok"}}, timeout=60)
        assert r2.status_code == 200 and r2.json()["output"]["texts"] == ["OK"]
        assert steps_run(tmp_path / "home" / "models" / "shout" / "1.0.0") < 64
    finally:
        assert srv.stop() == 0
