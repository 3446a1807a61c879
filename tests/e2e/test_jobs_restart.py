"""Async jobs survive the server's death: many jobs submitted to `mm serve` (Echo pipeline), the
server SIGKILLed while they run, started again: every job ends completed with its own result,
none lost, none with two results (SQLite, and the PostgreSQL MODELMORA_TEST_PG_DSN names: a fresh
database)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import TESTS_DIR
from serverproc import ServerProcess, mm

pytestmark = pytest.mark.slow  # real server processes

JOBS = 500  # the count
SAFETY_NET_S = 180.0  # not a performance bound: a hung server fails instead of hanging the suite


def _env() -> dict[str, str]:
    return {
        "MODELMORA_PIPELINES__TXT2EMBED": "worker_pipelines:Echo",
        "MODELMORA_ZYGOTE_PRELOAD": "numpy",
        "MODELMORA_JOB_CONCURRENCY": "4",
        "MODELMORA_GRPC_PORT": "0",
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p),
    }


def _results_per_job(home: Path, database_url: str) -> dict[str, int]:
    if not database_url:
        db = sqlite3.connect(home / "jobs.sqlite3")
        try:
            return dict(db.execute("SELECT job_id, count(*) FROM job_results GROUP BY job_id").fetchall())
        finally:
            db.close()
    out = subprocess.run(
        ["psql", database_url, "-At", "-F", " ", "-c", "SELECT job_id, count(*) FROM mm_job_results GROUP BY job_id"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {job: int(n) for job, n in (line.split() for line in out.splitlines() if line)}


def _unfinished(home: Path, database_url: str) -> tuple[int, int]:
    """(queued or running, running) jobs."""
    query = "SELECT count(*) FILTER (WHERE status IN ('queued', 'running')), count(*) FILTER (WHERE status = 'running')"
    if not database_url:
        db = sqlite3.connect(home / "jobs.sqlite3")
        try:
            row = db.execute(query + " FROM jobs").fetchone()
        finally:
            db.close()
        return int(row[0]), int(row[1])
    out = subprocess.run(
        ["psql", database_url, "-At", "-F", " ", "-c", query + " FROM mm_jobs"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


def _completed(srv: ServerProcess) -> int:
    return int(httpx.get(f"{srv.url}/api/v1/jobs?status=completed&limit=0", timeout=30).json()["total"])


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_sigkill_while_jobs_run_loses_none(
    tmp_path: Path, echo_dir: Path, database: str, request: pytest.FixtureRequest
) -> None:
    home = tmp_path / "home"
    mm("install", str(echo_dir), "--id", "echo", "--task", "txt2embed", home=home)
    database_url = ""
    if database == "postgres":
        database_url = request.getfixturevalue("pg_database")
    srv = ServerProcess(home, env={**_env(), "MODELMORA_DATABASE_URL": database_url}).start()
    texts: dict[str, str] = {}
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as client:

            def submit(i: int) -> tuple[str, str]:
                # 0.2 s each, 4 at a time: submitted (8 at a time) faster than they run, so that the
                # kill finds some queued or running even on a busy machine
                body = {"input_data": {"text": ["__sleep__0.2", f"job-{i}"]}}
                r = client.post("/api/v1/infer/echo/async", json=body)
                assert r.status_code == 202, r.text
                return r.json()["job_id"], f"job-{i}"

            with ThreadPoolExecutor(8) as pool:
                texts.update(pool.map(submit, range(JOBS)))
        deadline = time.monotonic() + SAFETY_NET_S
        while _completed(srv) < JOBS // 10:
            assert time.monotonic() < deadline, srv.log.read_text()
            time.sleep(0.05)
    finally:
        srv.stop(signal.SIGKILL)
    unfinished, running = _unfinished(home, database_url)
    assert unfinished > 0, "the kill came after every job had finished: nothing was tested"

    srv.start()
    try:
        deadline = time.monotonic() + SAFETY_NET_S
        while _completed(srv) < JOBS:
            assert time.monotonic() < deadline, srv.log.read_text()
            time.sleep(0.1)
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            listed = client.get("/api/v1/jobs?limit=1000").json()
            assert listed["total"] == JOBS
            assert {j["id"] for j in listed["jobs"]} == set(texts)
            assert {j["status"] for j in listed["jobs"]} == {"completed"}
            if running:  # what was running when the server died ran again
                assert max(j["attempts"] for j in listed["jobs"]) >= 2
            for job_id, text in texts.items():
                r = client.get(f"/api/v1/jobs/{job_id}/result")
                assert r.status_code == 200, r.text
                row = r.json()["output"]["embeddings"][1]
                assert row[:2] == [float(len(text)), float(sum(map(ord, text)))]
    finally:
        srv.stop()
    per_job = _results_per_job(home, database_url)
    assert per_job == dict.fromkeys(texts, 1)  # exactly one result record per job
