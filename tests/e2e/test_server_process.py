"""The server process under abuse and as an operator runs it: connection churn under a low
open-files limit, a connection cap, the listening socket kept out of the zygote and workers,
both AnyIO backends, JSON logs that are all JSON. Real `mm serve` subprocesses with the light
Echo pipeline (no torch import)."""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from modelmora.httpserver import REFUSAL

from conftest import TESTS_DIR
from serverproc import ServerProcess, mm

pytestmark = pytest.mark.slow  # real server processes

NOFILE = 400
"""The open-files limit (soft and hard) the churn test's server runs under."""


def _env(**extra: str) -> dict[str, str]:
    return {
        "MODELMORA_PIPELINES__TXT2EMBED": "worker_pipelines:Echo",
        "MODELMORA_ZYGOTE_PRELOAD": "numpy",
        "MODELMORA_TORCH_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p),
        **extra,
    }


def _infer(url: str, text: str) -> httpx.Response:
    return httpx.post(f"{url}/api/v1/infer/echo", json={"input_data": {"text": text}}, timeout=60)


def _short_request(port: int) -> bytes:
    """One GET on a fresh connection, closed after the response, as curl does."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        length = next(
            int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k.lower() == b"content-length"
        )
        while len(body) < length:
            body += s.recv(4096)
    return head.split(b"\r\n")[0]


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_connection_churn_and_a_burst_over_the_cap_leave_the_server_serving(tmp_path: Path, echo_dir: Path) -> None:
    """Keep-alive is 300 s here: connections whose clients closed must be closed at once anyway."""
    home = tmp_path / "home"
    mm("install", str(echo_dir), "--id", "echo", "--task", "txt2embed", home=home)
    srv = ServerProcess(
        home,
        _env(MODELMORA_ZYGOTE="false", MODELMORA_MAX_CONNECTIONS="100", MODELMORA_KEEP_ALIVE_TIMEOUT_S="300"),
        preexec_fn=_low_nofile,
    )
    srv.start()
    try:
        assert resource.prlimit(srv.pid, resource.RLIMIT_NOFILE) == (NOFILE, NOFILE)
        assert _infer(srv.url, "warm").status_code == 200
        baseline = _open_fds(srv.pid)

        # 3,000 short connections (more than 7 times the descriptor limit), from 4 threads
        statuses: list[bytes] = []

        def churn() -> None:
            statuses.extend(_short_request(srv.port) for _ in range(750))

        threads = [threading.Thread(target=churn) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(statuses) == 3000 and set(statuses) == {b"HTTP/1.1 200 "}

        # a burst of 250 concurrent connections over the cap of 100: the excess is answered 503
        # and closed at once; the connections within the cap are served
        burst = [socket.create_connection(("127.0.0.1", srv.port), timeout=30) for _ in range(250)]
        try:
            refused: list[bytes] = []
            held: list[socket.socket] = []
            time.sleep(1)  # the server accepted (and refused) them meanwhile
            readable, _, _ = select.select(burst, [], [], 5)
            for s in burst:
                if s in readable:
                    refused.append(s.recv(len(REFUSAL) + 10))
                else:
                    held.append(s)
            assert len(held) <= 100
            assert len(refused) >= 150 and all(r.startswith(b"HTTP/1.1 503 ") for r in refused)
            assert b"too_many_connections" in refused[0] and b"retry-after: 1" in refused[0]
            held[0].settimeout(30)
            held[0].sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert held[0].recv(4096).startswith(b"HTTP/1.1 200 ")
        finally:
            for s in burst:
                s.close()

        # the server closes what its clients closed: its descriptors come back to the baseline
        deadline = time.monotonic() + 30  # a safety net, not a performance bound
        while _open_fds(srv.pid) > baseline + 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _open_fds(srv.pid) <= baseline + 10
        assert _infer(srv.url, "after").json()["output"]["embeddings"]
        assert srv.proc is not None and srv.proc.poll() is None
    finally:
        code = srv.stop()
    log = srv.log.read_text()
    assert code == 0, log
    assert "Traceback" not in log and len(log.splitlines()) < 50, log[-5000:]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_each_backend_serves_with_json_logs_and_no_socket_in_workers(
    tmp_path: Path, echo_dir: Path, backend: str
) -> None:
    """`mm serve --backend B` with `log_format = "json"` and a zygote: a request is served; the zygote
    and the worker hold no TCP socket (the HTTP port stays in the server); after a load, a
    request and a stop, every line the server, the zygote and the worker wrote is JSON."""
    home = tmp_path / "home"
    mm("install", str(echo_dir), "--id", "echo", "--task", "txt2embed", home=home)
    srv = ServerProcess(home, _env(MODELMORA_LOG_FORMAT="json"), args=("--backend", backend)).start()
    try:
        r = _infer(srv.url, "hello")
        assert r.status_code == 200, r.text
        assert r.json()["output"]["embeddings"]
        status = httpx.get(f"{srv.url}/api/v1/status").json()
        worker = psutil.Process(status["models"][0]["worker"]["pid"])
        zygote = psutil.Process(status["zygote"]["pid"])
        assert worker.ppid() == zygote.pid
        for proc in (zygote, worker):
            assert proc.net_connections(kind="inet") == [], f"{proc.name()} holds a TCP socket"
        assert any(c.laddr.port == srv.port for c in psutil.Process(srv.pid).net_connections(kind="inet"))
    finally:
        code = srv.stop()
    lines = srv.log.read_text().splitlines()
    assert code == 0, "\n".join(lines)
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not JSON: {line!r}")
    names = {e.get("event") for e in events}
    assert {"listening", "stopping"} <= names
    assert any(e.get("event") == "ready" and e.get("role") == "zygote" for e in events)
    assert any(e.get("event") == "ready" and e.get("role") == "worker" for e in events)
    assert next(e for e in events if e.get("event") == "listening")["backend"] == backend


@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "spawn"])
def test_the_listening_socket_stays_in_the_server(tmp_path: Path, echo_dir: Path, zygote: bool) -> None:
    """The zygote and the workers hold no socket of the HTTP or gRPC front end (the HTTP one leaked into
    both: `ss -ltnp` listed mm-zygote and mm-worker on the port), read from their file descriptors."""
    home = tmp_path / "home"
    mm("install", str(echo_dir), "--id", "echo", "--task", "txt2embed", home=home)
    srv = ServerProcess(home, _env(MODELMORA_ZYGOTE=str(zygote).lower())).start()
    try:
        assert _infer(srv.url, "hello").status_code == 200
        status = httpx.get(f"{srv.url}/api/v1/status").json()
        pids = [status["models"][0]["worker"]["pid"]] + ([status["zygote"]["pid"]] if zygote else [])
        for pid in pids:
            proc = psutil.Process(pid)
            assert proc.net_connections(kind="inet") == [], f"{proc.name()} holds a TCP socket"
        listening = [c for c in psutil.Process(srv.pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert sorted(c.laddr.port for c in listening) == sorted([srv.port, srv.grpc_port])
    finally:
        assert srv.stop() == 0
