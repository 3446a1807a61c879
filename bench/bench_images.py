"""Image embedding throughput (tiny CLIP): raw RGB arrays through shared memory vs PNG bytes.

Both variants run real worker processes with the same model and torch thread count, in the
same run, alternating rounds:
- raw: what the server does: the supervisor decodes the base64 images with the REST layer's
  `load_images` (Pillow in worker threads, several at once, off the event loop), and the
  worker receives the pixels as arrays over the shm ring (no re-encoding);
- png: the baseline: base64 decoded in the supervisor, the PNG bytes go through the ring and
  the worker decodes them (one thread, in front of the model).
For each we time a batch end to end from base64 in hand to embeddings back, and report
images/s (median of rounds) plus the supervisor's CPU for decoding.

    uv run python bench/bench_images.py [--size 512] [--batch 16] [--rounds 7] [--no-write]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import anyio.to_thread
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))

from _results import cpu_model, report  # noqa: E402

from modelmora.images import ImageLimits, load_images  # noqa: E402
from modelmora.ipc import segments  # noqa: E402
from modelmora.lifecycle import TensorData, WorkerHandle, WorkerSpec  # noqa: E402

HEADING = "## Image embedding: raw arrays through shm vs PNG decoded in the worker"
_MB = 2**20


def make_images(n: int, size: int) -> list[bytes]:
    """Photo-like PNGs (smooth gradients plus noise), so decoding costs what real images cost."""
    rng = np.random.default_rng(0)
    out = []
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        base = np.stack([(xx + i * 7) % 256, (yy + i * 13) % 256, (xx + yy) // 2 % 256], axis=-1)
        noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def decode(png: bytes) -> TensorData:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    return TensorData("|u1", (img.height, img.width, 3), img.tobytes())


async def run(args: argparse.Namespace) -> str:
    from tiny_models import build_clip

    tmp = Path(tempfile.mkdtemp(prefix="mm-bench-img-"))
    model = build_clip(tmp / "clip")
    pngs = make_images(args.batch, args.size)
    refs = [base64.b64encode(p).decode() for p in pngs]
    limits = ImageLimits(max_bytes=64 * _MB, max_pixels=2**26, fetch_timeout_s=10, allow_private_urls=False)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "peers"), env.get("PYTHONPATH", "")])
    common = {
        "instance_id": segments.new_instance_id(),
        "request_ring_bytes": 64 * _MB,
        "response_ring_bytes": 16 * _MB,
        "start_timeout_s": 300.0,
        "stop_grace_s": 5.0,
        "env": env,
    }
    raw_spec = WorkerSpec(
        "clip",
        "1",
        str(model),
        "img2embed",
        "modelmora_workers.pipelines.image_embedding:ImageEmbedding",
        device="cpu",
        threads=args.threads,
    )
    png_spec = WorkerSpec(
        "clip-png",
        "1",
        str(model),
        "img2embed",
        "png_image_embedding:PngImageEmbedding",
        device="cpu",
        threads=args.threads,
    )
    params = {"normalize": False, "batch_size": args.batch}
    times: dict[str, list[float]] = {"raw": [], "png": []}
    decode_s: list[float] = []
    async with (
        WorkerHandle.open(raw_spec, **common) as raw_w,
        WorkerHandle.open(png_spec, **common) as png_w,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(raw_w.read_loop)
        tg.start_soon(png_w.read_loop)
        for _ in range(2):  # warm both
            arrays = [decode(p) for p in pngs]
            a = await raw_w.infer({"image": arrays}, params)
            b = await png_w.infer({"png": pngs}, params)
        ea, eb = a["embeddings"], b["embeddings"]
        assert isinstance(ea, TensorData) and isinstance(eb, TensorData)
        same = np.allclose(np.frombuffer(ea.data, "<f4"), np.frombuffer(eb.data, "<f4"), atol=1e-5)
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            c0 = time.process_time()
            pixels = await load_images(refs, "$.input_data.image", limits)  # what the REST layer runs
            arrays = [TensorData("|u1", (p.height, p.width, 3), p.data) for p in pixels]
            decode_s.append(time.process_time() - c0)
            await raw_w.infer({"image": arrays}, params)
            times["raw"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            encoded = [base64.b64decode(r) for r in refs]
            await png_w.infer({"png": encoded}, params)
            times["png"].append(time.perf_counter() - t0)
        tg.cancel_scope.cancel()
    raw_rate = args.batch / statistics.median(times["raw"])
    png_rate = args.batch / statistics.median(times["png"])
    enc_kb = sum(len(p) for p in pngs) / len(pngs) / 1024
    raw_kb = args.size * args.size * 3 / 1024
    cmd = "uv run python bench/bench_images.py " + " ".join(sys.argv[1:])
    return (
        f"{HEADING}\n\n"
        f"`{cmd.strip()}` · {time.strftime('%Y-%m-%d')} · {cpu_model()}, {os.cpu_count()} cores,"
        f" torch threads {args.threads}\n\n"
        f"Tiny random-weight CLIP (built by tests/tiny_models.py), batches of {args.batch} photo-like"
        f" {args.size}x{args.size} PNGs ({enc_kb:.0f} KiB encoded, {raw_kb:.0f} KiB raw each), median of"
        f" {args.rounds} alternating rounds. Both give the same embeddings: {same}.\n\n"
        "| path | images/s | batch ms (median) | ratio |\n|---|---|---|---|\n"
        f"| raw arrays through shm (decoded in the supervisor) | {raw_rate:.1f} |"
        f" {statistics.median(times['raw']) * 1e3:.1f} | {raw_rate / png_rate:.2f}x |\n"
        f"| PNG bytes, decoded in the worker (baseline) | {png_rate:.1f} |"
        f" {statistics.median(times['png']) * 1e3:.1f} | 1.00x |\n\n"
        f"Supervisor CPU for decoding on the raw path: {statistics.median(decode_s) * 1e3 / args.batch:.2f} ms"
        " per image (worker threads, off the event loop). With a tiny model decoding dominates the batch"
        " time; the raw path decodes images in parallel threads of the supervisor instead of serially in"
        " front of the model, so the worker's time goes to the model only.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    text = anyio.run(run, args)
    report(HEADING, text, write=not args.no_write)


if __name__ == "__main__":
    main()
