"""Two servers sharing one PostgreSQL job store and one Redis (`redis_url`): jobs submitted to either
travel through the job streams and run on either; one server SIGKILLed halfway with entries pending,
the survivor claims them and every job ends completed with its own result, exactly one result record
each. Redis restarted under load (a throwaway redis-server) and PostgreSQL restarted under load (a
throwaway cluster): nothing lost or doubled. With the model warm on one server only, its jobs run
there.

PostgreSQL and Redis are the ones MODELMORA_TEST_PG_DSN and MODELMORA_TEST_REDIS_URL name (a fresh
database per test; the servers' Redis keys are under the database's namespace, deleted afterwards),
except where the test restarts the service."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from pgserver import PgCluster, RedisServer, available, delete_keys, missing

from conftest import TESTS_DIR, RedisUnderTest
from serverproc import ServerProcess, mm

pytestmark = pytest.mark.slow  # real server processes

JOBS = 400  # the count for two replicas
SAFETY_NET_S = 240.0  # not a performance bound: a hung server fails instead of hanging the suite


def _server(
    tmp_path: Path,
    name: str,
    echo_dir: Path,
    database_url: str,
    redis_url: str = "",
    warm_wait_s: str = "0",
    concurrency: str = "8",
) -> ServerProcess:
    home = tmp_path / name
    mm("install", str(echo_dir), "--id", "echo", "--task", "txt2embed", home=home)
    env = {
        "MODELMORA_PIPELINES__TXT2EMBED": "worker_pipelines:Echo",
        "MODELMORA_ZYGOTE_PRELOAD": "numpy",
        "MODELMORA_JOB_CONCURRENCY": concurrency,
        "MODELMORA_JOB_LEASE_S": "1",
        "MODELMORA_GRPC_PORT": "0",
        "MODELMORA_DATABASE_URL": database_url,
        "MODELMORA_REDIS_URL": redis_url,
        "MODELMORA_JOB_WARM_WAIT_S": warm_wait_s,
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p),
    }
    return ServerProcess(home, env=env).start()


def _psql(url: str, query: str) -> list[list[str]]:
    out = subprocess.run(["psql", url, "-At", "-F", " ", "-c", query], check=True, capture_output=True, text=True)
    return [line.split() for line in out.stdout.splitlines() if line]


def _count(url: str, status: str) -> int:
    return int(_psql(url, f"SELECT count(*) FROM mm_jobs WHERE status = '{status}'")[0][0])


def _prefix(url: str) -> str:
    """The servers' Redis key prefix: the database's namespace."""
    ((namespace,),) = _psql(url, "SELECT value FROM mm_jobs_meta WHERE name = 'namespace'")
    return f"modelmora:{namespace}:"


def _pending(redis_url: str, prefix: str) -> int:
    """Entries delivered and not acknowledged, over every job stream."""
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return sum(
            int(client.xpending(f"{prefix}jobs:{m}", "runners")["pending"]) for m in client.smembers(f"{prefix}models")
        )
    finally:
        client.close()


def _one_result_each(url: str, ids: list[str] | dict[str, str]) -> None:
    per_job = {job: int(n) for job, n in _psql(url, "SELECT job_id, count(*) FROM mm_job_results GROUP BY job_id")}
    assert {j: per_job.get(j) for j in ids} == dict.fromkeys(ids, 1)  # none lost, none with two


def _submit(srv: ServerProcess, text: str, sleep_s: float) -> str:
    body = {"input_data": {"text": [f"__sleep__{sleep_s}", text]}}
    r = httpx.post(f"{srv.url}/api/v1/infer/echo/async", json=body, timeout=30)
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


def _pending_on(redis_url: str, prefix: str, srv: ServerProcess) -> int:
    """Entries delivered to `srv` (its consumer: host-pid-...) and not acknowledged."""
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    mark = f"{socket.gethostname()}-{srv.pid}-"
    try:
        total = 0
        for m in client.smembers(f"{prefix}models"):
            for c in client.xpending(f"{prefix}jobs:{m}", "runners")["consumers"]:
                total += int(c["pending"]) if c["name"].startswith(mark) else 0
        return total
    finally:
        client.close()


def test_a_replica_dies_and_the_other_claims_its_entries(
    tmp_path: Path, echo_dir: Path, pg_database: str, test_redis: RedisUnderTest
) -> None:
    url = pg_database
    a = _server(tmp_path, "a", echo_dir, url, test_redis.url, concurrency="4")
    b = _server(tmp_path, "b", echo_dir, url, test_redis.url, concurrency="4")
    prefix = _prefix(url)
    test_redis.cleanup.append(prefix)
    texts: dict[str, str] = {}

    def submit(servers: list[ServerProcess], numbers: range) -> None:
        def one(i: int) -> tuple[str, str]:  # the first half 0.5 s each, 4 at a time per server: the
            # kill finds some running; the second half (to the survivor, after the kill) quick
            sleep_s = 0.5 if i < JOBS // 2 else 0.05
            return _submit(servers[i % len(servers)], f"job-{i}", sleep_s), f"job-{i}"

        with ThreadPoolExecutor(8) as pool:
            texts.update(pool.map(one, numbers))

    try:
        submit([a, b], range(JOBS // 2))  # half to either
        deadline = time.monotonic() + SAFETY_NET_S
        while _count(url, "completed") < JOBS // 8 or _pending_on(test_redis.url, prefix, a) < 2:
            assert time.monotonic() < deadline, a.log.read_text()
            time.sleep(0.02)
        a.stop(signal.SIGKILL)  # with entries pending on it
        submit([b], range(JOBS // 2, JOBS))  # the other half to the survivor
        assert len(texts) == JOBS
        while _count(url, "completed") < JOBS:
            assert time.monotonic() < deadline, b.log.read_text()
            time.sleep(0.1)
        with httpx.Client(base_url=b.url, timeout=30) as client:  # the survivor answers for every job
            for job_id, text in texts.items():
                r = client.get(f"/api/v1/jobs/{job_id}/result")
                assert r.status_code == 200, r.text
                assert r.json()["output"]["embeddings"][1][:2] == [float(len(text)), float(sum(map(ord, text)))]
        while _pending(test_redis.url, prefix):  # the dead server's entries: claimed, then acknowledged
            assert time.monotonic() < deadline, b.log.read_text()
            time.sleep(0.1)
        metrics = httpx.get(f"{b.url}/metrics", timeout=30).text
        assert 'modelmora_jobs_total{event="reclaimed",model="echo"}' in metrics  # through XAUTOCLAIM
    finally:
        a.stop(signal.SIGKILL)
        b.stop()
    (rerun,) = _psql(url, "SELECT count(*) FROM mm_jobs WHERE attempts > 1")[0]
    assert int(rerun) > 0  # what the dead server was running ran again on the survivor
    _one_result_each(url, texts)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A throwaway redis-server (restarted by the test)."""
    if not RedisServer.available():
        missing("redis-server is not installed")
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


def test_redis_restarted_under_load(
    tmp_path: Path, echo_dir: Path, pg_database: str, redis_server: RedisServer
) -> None:
    """Redis goes away (its streams lost) while two servers run jobs, and comes back: the servers
    run everything from the store meanwhile, then use the streams again; no job lost or doubled."""
    url = pg_database
    a = _server(tmp_path, "a", echo_dir, url, redis_server.url)
    b = _server(tmp_path, "b", echo_dir, url, redis_server.url)
    ids: list[str] = []
    try:
        ids += [_submit(a if i % 2 else b, f"job-{i}", 0.05) for i in range(150)]
        deadline = time.monotonic() + SAFETY_NET_S
        while _count(url, "completed") < 20:
            assert time.monotonic() < deadline, a.log.read_text()
            time.sleep(0.05)
        redis_server.stop()
        ids += [_submit(a if i % 2 else b, f"away-{i}", 0.05) for i in range(50)]  # accepted: the store is the truth
        redis_server.start()
        ids += [_submit(a if i % 2 else b, f"back-{i}", 0.05) for i in range(50)]
        while _count(url, "completed") < len(ids):
            assert time.monotonic() < deadline, a.log.read_text() + b.log.read_text()
            time.sleep(0.1)
        prefix = _prefix(url)
        while _pending(redis_server.url, prefix):  # what was announced after the restart is acknowledged
            assert time.monotonic() < deadline, a.log.read_text()
            time.sleep(0.1)
        for srv in (a, b):
            assert "redis_unavailable" in srv.log.read_text()
    finally:
        a.stop()
        b.stop()
    _one_result_each(url, ids)


def test_postgresql_restarted_under_load(tmp_path: Path, echo_dir: Path) -> None:
    """The database restarts while jobs run (a throwaway cluster): the server reconnects, no job is
    lost or doubled."""
    if not available():
        missing("PostgreSQL (initdb, pg_ctl) is not installed")
    pg = PgCluster().start()
    try:
        url = pg.create_database(f"t_{uuid.uuid4().hex[:12]}")
        srv = _server(tmp_path, "solo", echo_dir, url)
        ids: list[str] = []
        try:
            with httpx.Client(base_url=srv.url, timeout=30) as client:
                ids = [_submit(srv, f"job-{i}", 0.05) for i in range(100)]
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
        _one_result_each(url, ids)
    finally:
        pg.stop()


def test_jobs_run_where_their_model_is_warm(
    tmp_path: Path, echo_dir: Path, pg_database: str, test_redis: RedisUnderTest
) -> None:
    url = pg_database
    a = _server(tmp_path, "warm", echo_dir, url, test_redis.url, warm_wait_s="60")
    b = _server(tmp_path, "cold", echo_dir, url, test_redis.url, warm_wait_s="60")
    test_redis.cleanup.append(_prefix(url))
    try:
        r = httpx.post(f"{a.url}/api/v1/infer/echo", json={"input_data": {"text": "warm up"}}, timeout=60)
        assert r.status_code == 200, r.text  # echo is loaded on a only
        for i in range(40):  # all submitted to the cold server
            r = httpx.post(f"{b.url}/api/v1/infer/echo/async", json={"input_data": {"text": f"j{i}"}}, timeout=30)
            assert r.status_code == 202, r.text
        deadline = time.monotonic() + SAFETY_NET_S
        while _count(url, "completed") < 40:
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
    delete_keys(test_redis.url, _prefix(url))
