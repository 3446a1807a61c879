"""Two servers sharing one PostgreSQL job store: jobs submitted to either run on either; one server
SIGKILLed halfway, its running jobs run again on the survivor once their leases expire: every job
ends completed with its own result, exactly one result record each."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pgserver import PgCluster, available

from conftest import TESTS_DIR
from serverproc import ServerProcess, mm

pytestmark = pytest.mark.slow  # real server processes and a PostgreSQL cluster

JOBS = 200
SAFETY_NET_S = 180.0  # not a performance bound: a hung server fails instead of hanging the suite


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    if not available():
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed")
    cluster = PgCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _server(tmp_path: Path, name: str, echo_dir: Path, database_url: str, warm_wait_s: str = "0") -> ServerProcess:
    home = tmp_path / name
    mm("install", str(echo_dir), "--id", "echo", "--task", "txt2embed", home=home)
    env = {
        "MODELMORA_PIPELINES__TXT2EMBED": "worker_pipelines:Echo",
        "MODELMORA_ZYGOTE_PRELOAD": "numpy",
        "MODELMORA_JOB_CONCURRENCY": "8",
        "MODELMORA_JOB_LEASE_S": "1",
        "MODELMORA_GRPC_PORT": "0",
        "MODELMORA_DATABASE_URL": database_url,
        "MODELMORA_JOB_WARM_WAIT_S": warm_wait_s,
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p),
    }
    return ServerProcess(home, env=env).start()


def _psql(url: str, query: str) -> list[list[str]]:
    out = subprocess.run(["psql", url, "-At", "-F", " ", "-c", query], check=True, capture_output=True, text=True)
    return [line.split() for line in out.stdout.splitlines() if line]


def test_a_replica_dies_and_the_other_finishes_its_jobs(tmp_path: Path, echo_dir: Path, pg: PgCluster) -> None:
    url = pg.create_database(f"t_{uuid.uuid4().hex[:12]}")
    a = _server(tmp_path, "a", echo_dir, url)
    b = _server(tmp_path, "b", echo_dir, url)
    texts: dict[str, str] = {}
    try:
        for i in range(JOBS):
            srv = a if i % 2 else b
            text = f"job-{i}"
            body = {"input_data": {"text": ["__sleep__0.1", text]}}  # 0.1 s each: the kill finds some running
            r = httpx.post(f"{srv.url}/api/v1/infer/echo/async", json=body, timeout=30)
            assert r.status_code == 202, r.text
            texts[r.json()["job_id"]] = text
        deadline = time.monotonic() + SAFETY_NET_S
        while int(_psql(url, "SELECT count(*) FROM mm_jobs WHERE status = 'completed'")[0][0]) < JOBS // 10:
            assert time.monotonic() < deadline, a.log.read_text()
            time.sleep(0.05)
        a.stop(signal.SIGKILL)
        (running,) = _psql(url, "SELECT count(*) FROM mm_jobs WHERE status = 'running'")[0]
        assert int(running) > 0, "nothing was running at the kill: nothing was tested"
        while int(_psql(url, "SELECT count(*) FROM mm_jobs WHERE status = 'completed'")[0][0]) < JOBS:
            assert time.monotonic() < deadline, b.log.read_text()
            time.sleep(0.1)
        with httpx.Client(base_url=b.url, timeout=30) as client:  # the survivor answers for every job
            for job_id, text in texts.items():
                r = client.get(f"/api/v1/jobs/{job_id}/result")
                assert r.status_code == 200, r.text
                assert r.json()["output"]["embeddings"][1][:2] == [float(len(text)), float(sum(map(ord, text)))]
    finally:
        a.stop(signal.SIGKILL)
        b.stop()
    (rerun,) = _psql(url, "SELECT count(*) FROM mm_jobs WHERE attempts > 1")[0]
    assert int(rerun) > 0  # what the dead server was running ran again on the survivor
    per_job = {job: int(n) for job, n in _psql(url, "SELECT job_id, count(*) FROM mm_job_results GROUP BY job_id")}
    assert per_job == dict.fromkeys(texts, 1)


def test_postgresql_restarted_under_load(tmp_path: Path, echo_dir: Path, pg: PgCluster) -> None:
    """The database restarts while jobs run: the server reconnects, no job is lost or doubled."""
    url = pg.create_database(f"t_{uuid.uuid4().hex[:12]}")
    srv = _server(tmp_path, "solo", echo_dir, url)
    ids: list[str] = []
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            for i in range(100):
                body = {"input_data": {"text": ["__sleep__0.05", f"job-{i}"]}}
                r = client.post("/api/v1/infer/echo/async", json=body)
                assert r.status_code == 202, r.text
                ids.append(r.json()["job_id"])
            deadline = time.monotonic() + SAFETY_NET_S
            while client.get("/api/v1/jobs?status=completed&limit=0").json()["total"] < 10:
                assert time.monotonic() < deadline, srv.log.read_text()
                time.sleep(0.05)
            pg.restart()
            while True:  # answers 503 storage_unavailable while the database is away, then recovers
                r = client.get("/api/v1/jobs?status=completed&limit=0")
                if r.status_code == 200 and r.json()["total"] == len(ids):
                    break
                assert r.status_code in (200, 503), r.text
                assert time.monotonic() < deadline, srv.log.read_text()
                time.sleep(0.1)
            r = client.post("/api/v1/infer/echo/async", json={"input_data": {"text": "after"}})
            assert r.status_code == 202, r.text
    finally:
        srv.stop()
    per_job = {job: int(n) for job, n in _psql(url, "SELECT job_id, count(*) FROM mm_job_results GROUP BY job_id")}
    assert {j: per_job.get(j) for j in ids} == dict.fromkeys(ids, 1)


def test_jobs_run_where_their_model_is_warm(tmp_path: Path, echo_dir: Path, pg: PgCluster) -> None:
    url = pg.create_database(f"t_{uuid.uuid4().hex[:12]}")
    a = _server(tmp_path, "warm", echo_dir, url, warm_wait_s="60")
    b = _server(tmp_path, "cold", echo_dir, url, warm_wait_s="60")
    try:
        r = httpx.post(f"{a.url}/api/v1/infer/echo", json={"input_data": {"text": "warm up"}}, timeout=60)
        assert r.status_code == 200, r.text  # echo is loaded on a only
        for i in range(40):  # all submitted to the cold server
            r = httpx.post(f"{b.url}/api/v1/infer/echo/async", json={"input_data": {"text": f"j{i}"}}, timeout=30)
            assert r.status_code == 202, r.text
        deadline = time.monotonic() + SAFETY_NET_S
        while int(_psql(url, "SELECT count(*) FROM mm_jobs WHERE status = 'completed'")[0][0]) < 40:
            assert time.monotonic() < deadline, b.log.read_text()
            time.sleep(0.05)
        ran_on_a = httpx.get(f"{a.url}/metrics", timeout=30).text
        ran_on_b = httpx.get(f"{b.url}/metrics", timeout=30).text
        assert 'modelmora_jobs_total{event="completed",model="echo"} 40.0' in ran_on_a
        assert 'event="completed"' not in ran_on_b
        status = httpx.get(f"{b.url}/api/v1/status", timeout=30).json()
        assert all(m["state"] != "ready" for m in status["models"] if m["model_id"] == "echo")  # never loaded there
    finally:
        a.stop()
        b.stop()
