"""The cost of security: throughput and added latency at concurrency 64 with TLS + token
authentication against cleartext without authentication, in the same run, over REST and gRPC.

Two `mm serve` processes serve the light Echo pipeline (no torch: what is measured is the edge, not
a model), one after the other, never both at once: "plain" (HTTP/1.1 cleartext, gRPC cleartext, no
tokens) and "secure" (HTTPS, gRPC over TLS, a tokens file of 20 tokens, the client sending one of
them). The load comes from this process (uvloop), closed loop, `--concurrency` requests in flight:

- REST: wrk (one thread) over `--concurrency` HTTP/1.1 keep-alive connections (TLS: HTTPS),
  `POST /api/v1/infer/echo` with one short text (needs wrk: `apt-get install -y wrk`);
- gRPC: grpclib, one HTTP/2 connection (TLS: ALPN h2), `Infer` with one short text.

Each (protocol, mode) runs `--rounds` times, the modes alternating, after a warm-up; the best round
is kept. The ratio is secure / plain throughput; added latency is the difference of the medians.
The client's own TLS work is part of the cost measured (it shares the machine with the server).

    uv run python bench/bench_security.py [--duration 10] [--concurrency 64] [--rounds 2] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
from grpclib.client import Channel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _results import cpu_model, write_section

from modelmora._proto.modelmora import v1

from conftest import ECHO_LAYOUT, TESTS_DIR
from serverproc import ServerProcess, mm
from tlsfiles import TlsFiles

TOKEN = "bench-token-" + "x" * 32
BODY = b'{"input_data": {"text": "the quick brown fox jumps over the lazy dog"}}'


@dataclass
class Result:
    protocol: str
    mode: str
    rate: float
    p50_ms: float
    p99_ms: float
    errors: int


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {
        "MODELMORA_PIPELINES__TXT2EMBED": "worker_pipelines:Echo",
        "MODELMORA_ZYGOTE": "false",
        "MODELMORA_ZYGOTE_PRELOAD": "numpy",
        "MODELMORA_TORCH_THREADS": "1",
        "MODELMORA_LOG_LEVEL": "warning",
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p),
        **extra,
    }


def start(home: Path, mode: str, tls: TlsFiles) -> ServerProcess:
    if not (home / "registry.sqlite3").exists():
        src = home.parent / f"{home.name}-echo"
        src.mkdir(parents=True)
        (src / "weights.bin").write_bytes(b"\0" * 16)
        for name in ECHO_LAYOUT:
            (src / name).write_text("{}")
        mm("install", str(src), "--id", "echo", "--task", "txt2embed", home=home)
    extra: dict[str, str] = {}
    verify = None
    if mode == "secure":
        tokens = home / "tokens"
        lines = [f"user{i} infer {'u' * 20}{i:04d}" for i in range(19)] + [f"bench infer,read {TOKEN}"]
        tokens.write_text("\n".join(lines) + "\n")
        extra = {**tls.env(), "MODELMORA_AUTH__TOKENS_FILE": str(tokens)}
        verify = tls.client_context(alpn=("http/1.1",))
    srv = ServerProcess(home, _env(extra), verify=verify).start()
    headers = {"authorization": f"Bearer {TOKEN}"} if mode == "secure" else {}
    cold = httpx.post(
        f"{srv.url}/api/v1/infer/echo",
        content=BODY,
        headers={**headers, "content-type": "application/json"},
        verify=verify or True,
        timeout=120,
    )  # the worker's cold start, outside the runs
    cold.raise_for_status()
    return srv


async def closed_loop(
    call: Callable[[], Awaitable[bool]], concurrency: int, duration_s: float
) -> tuple[list[float], int]:
    """Latencies (s) of the calls that ended within `duration_s`, and the count of failed ones."""
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + duration_s

    async def one() -> None:
        nonlocal errors
        while (t0 := time.perf_counter()) < end:
            ok = await call()
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    await asyncio.gather(*(one() for _ in range(concurrency)))
    return latencies, errors


def summarize(protocol: str, mode: str, latencies: list[float], errors: int, duration_s: float) -> Result:
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else float("nan")
    median = statistics.median(latencies) if latencies else float("nan")
    return Result(protocol, mode, len(latencies) / duration_s, median * 1e3, p99 * 1e3, errors)


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
%s
"""


def _wrk_ms(text: str, pct: str) -> float:
    """A percentile of wrk's --latency distribution, in ms."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == pct:
            value, unit = float(fields[1].rstrip("musk")), fields[1].lstrip("0123456789.")
            return value * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]
    return float("nan")


async def run_rest(srv: ServerProcess, mode: str, tls: TlsFiles, args: argparse.Namespace) -> Result:
    """wrk (one thread, `--concurrency` keep-alive HTTP/1.1 connections; HTTPS for secure)."""
    auth = f'wrk.headers["Authorization"] = "Bearer {TOKEN}"' if mode == "secure" else ""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    await asyncio.to_thread(script.write_text, WRK_SCRIPT % (BODY.decode(), auth))
    url = f"{srv.url}/api/v1/infer/echo"
    base = ["wrk", "-t1", f"-c{args.concurrency}", "--latency", "-s", str(script)]
    try:
        await anyio_run([*base, f"-d{max(1, round(args.warmup))}s", url])
        text = await anyio_run([*base, f"-d{max(1, round(args.duration))}s", url])
    finally:
        await asyncio.to_thread(script.unlink)
    rate = next(float(line.split()[1]) for line in text.splitlines() if line.startswith("Requests/sec:"))
    errors = sum(int(line.split()[-1]) for line in text.splitlines() if "Non-2xx" in line)
    return Result("REST", mode, rate, _wrk_ms(text, "50%"), _wrk_ms(text, "99%"), errors)


async def anyio_run(command: list[str]) -> str:
    proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{command[0]} exited with {proc.returncode}")
    return out.decode()


async def run_grpc(srv: ServerProcess, mode: str, tls: TlsFiles, args: argparse.Namespace) -> Result:
    ssl = tls.client_context(alpn=("h2",)) if mode == "secure" else None
    metadata = {"authorization": f"Bearer {TOKEN}"} if mode == "secure" else None
    channel = Channel("127.0.0.1", srv.grpc_port, ssl=ssl)
    stub = v1.InferenceServiceStub(channel)
    request = v1.InferRequest(model_id="echo", texts=["the quick brown fox jumps over the lazy dog"])
    try:

        async def call() -> bool:
            try:
                await stub.infer(request, metadata=metadata)
            except Exception:
                return False
            return True

        await closed_loop(call, args.concurrency, args.warmup)
        latencies, errors = await closed_loop(call, args.concurrency, args.duration)
    finally:
        channel.close()
    return summarize("gRPC", mode, latencies, errors, args.duration)


def best(results: list[Result], protocol: str, mode: str) -> Result:
    return max((r for r in results if (r.protocol, r.mode) == (protocol, mode)), key=lambda r: r.rate)


def report(results: list[Result], args: argparse.Namespace) -> str:
    lines = [
        "## Security: TLS + tokens against cleartext (bench/bench_security.py)",
        "",
        f"{datetime.now(UTC):%Y-%m-%d}, {cpu_model()}, {os.cpu_count()} cores; Echo pipeline (no model), "
        f"concurrency {args.concurrency}, {args.duration:g} s per run, best of {args.rounds}; REST load from wrk "
        "(HTTP/1.1 keep-alive), gRPC from grpclib (one HTTP/2 connection), on the same machine (the clients' TLS "
        "work is part of the cost).",
        "",
        "| protocol | mode | req/s | p50 ms | p99 ms | errors | throughput ratio | added p50 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for protocol in ("REST", "gRPC"):
        plain, secure = best(results, protocol, "plain"), best(results, protocol, "secure")
        for r in (plain, secure):
            ratio = f"{secure.rate / plain.rate:.2f}x" if r is secure else ""
            added = f"{secure.p50_ms - plain.p50_ms:+.2f}" if r is secure else ""
            cells = [
                protocol,
                r.mode,
                f"{r.rate:.0f}",
                f"{r.p50_ms:.2f}",
                f"{r.p99_ms:.2f}",
                str(r.errors),
                ratio,
                added,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="mm-bench-sec-") as tmp:
        root = Path(tmp)
        tls = TlsFiles(root / "tls")
        for round_ in range(args.rounds):
            modes = ("plain", "secure") if round_ % 2 == 0 else ("secure", "plain")
            for mode in modes:
                srv = start(root / f"home-{mode}", mode, tls)
                try:
                    for run in (run_rest, run_grpc):
                        result = await run(srv, mode, tls, args)
                        print(f"round {round_ + 1} {result}", flush=True)
                        results.append(result)
                finally:
                    srv.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print the table, leave bench/RESULTS.md alone")
    args = parser.parse_args()
    try:
        import uvloop

        results = uvloop.run(main_async(args))
    except ImportError:  # pragma: no cover
        results = asyncio.run(main_async(args))
    table = report(results, args)
    print(table)
    if not args.no_write:
        write_section("## Security: TLS + tokens", table)


if __name__ == "__main__":
    main()
