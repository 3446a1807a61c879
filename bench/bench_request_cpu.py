"""The supervisor's CPU per request, with the light Echo pipeline (no model: what the request path
itself costs), against another build in the same run.

Starts `mm serve` for this build and, with `--baseline-mm`, for another build (e.g. the previous
main, in an environment of its own); one spawned Echo worker each, logs at warning. Then runs wrk
(closed loop, one short text per request) for `--seconds` against each server in turn, in rounds
that alternate the order, and divides the supervisor process's CPU time (user + system) by the
requests answered. Reports the median over rounds per concurrency, and requests/s.

    uv run python bench/bench_request_cpu.py [--rounds 6] [--seconds 5] [--concurrency 1,32] [--baseline-mm PATH]

Needs wrk (Debian/Ubuntu: `apt-get install -y wrk`).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serverproc import ServerProcess, mm

TESTS = Path(__file__).resolve().parent.parent / "tests"

LUA = """wrk.method = "POST"
wrk.body = '{"input_data": {"text": "The quick brown fox jumps over the lazy dog."}}'
wrk.headers["Content-Type"] = "application/json"
"""


def _model_dir(root: Path) -> Path:
    d = root / "echo-src"
    d.mkdir(parents=True, exist_ok=True)
    (d / "weights.bin").write_bytes(b"\0" * 16)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        (d / name).write_text("{}")
    return d


def start(label: str, tmp: Path, build: str | None) -> ServerProcess:
    home = tmp / f"home-{label}"
    install = ["install", str(_model_dir(tmp)), "--id", "echo", "--task", "txt2embed"]
    if build is None:
        mm(*install, home=home)
    else:
        subprocess.run([build, *install], env={**os.environ, "MODELMORA_HOME": str(home)}, check=True)
    env = {
        "MODELMORA_PIPELINES__TXT2EMBED": "worker_pipelines:Echo",
        "MODELMORA_ZYGOTE": "false",
        "MODELMORA_ZYGOTE_PRELOAD": "numpy",
        "MODELMORA_TORCH_THREADS": "1",
        "MODELMORA_LOG_LEVEL": "warning",
        "PYTHONPATH": str(TESTS),
    }
    srv = ServerProcess(home, env, command=[build] if build else None).start()
    r = httpx.post(f"{srv.url}/api/v1/infer/echo", json={"input_data": {"text": "warm"}}, timeout=120)
    assert r.status_code == 200, r.text
    return srv


def run_wrk(srv: ServerProcess, concurrency: int, seconds: int, script: Path) -> tuple[float, float]:
    """(supervisor CPU microseconds per request, requests per second) of one wrk run."""
    proc = psutil.Process(srv.pid)
    before = proc.cpu_times()
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "-s", str(script), f"{srv.url}/api/v1/infer/echo"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    after = proc.cpu_times()
    m = re.search(r"(\d+) requests in", out)
    assert m is not None and "Non-2xx" not in out, out
    requests = int(m.group(1))
    cpu = (after.user - before.user) + (after.system - before.system)
    return cpu / requests * 1e6, requests / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--baseline-mm", default=None, help="the `mm` of another build to compare with")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        script = tmp / "post.lua"
        script.write_text(LUA)
        sides = {"this build": start("this", tmp, None)}
        if args.baseline_mm:
            sides["baseline"] = start("baseline", tmp, args.baseline_mm)
        results: dict[tuple[str, int], list[tuple[float, float]]] = {}
        try:
            for i in range(args.rounds):
                order = list(sides.items()) if i % 2 == 0 else list(reversed(sides.items()))
                for c in levels:
                    for label, srv in order:
                        results.setdefault((label, c), []).append(run_wrk(srv, c, args.seconds, script))
        finally:
            for srv in sides.values():
                srv.stop()
    print(f"| build | concurrency | supervisor CPU µs/request (median of {args.rounds}) | requests/s (median) |")
    print("|---|---:|---:|---:|")
    for (label, c), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cpu = statistics.median(r[0] for r in runs)
        rate = statistics.median(r[1] for r in runs)
        print(f"| {label} | {c} | {cpu:.0f} | {rate:.0f} |")


if __name__ == "__main__":
    main()
