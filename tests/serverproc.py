"""Run `mm serve` as a real subprocess for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, never one this process handed out before (an HTTP and a gRPC
    port asked for in a row must differ, and a stopped server's port may linger)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def mm(
    *args: str, home: Path, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the `mm` CLI in a subprocess."""
    full = {**os.environ, **(env or {}), "MODELMORA_HOME": str(home), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "modelmora", *args], env=full, capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _mm_command() -> list[str]:
    """The `mm` console script of this environment (what `uv run mm` runs), else `python -m modelmora`."""
    script = Path(sys.executable).with_name("mm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "modelmora"]


class ServerProcess:
    """`mm serve` on a free port with its own MODELMORA_HOME."""

    def __init__(
        self,
        home: Path,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        preexec_fn: Callable[[], object] | None = None,
        command: Sequence[str] | None = None,
        verify: ssl.SSLContext | None = None,
    ) -> None:
        self.command = list(command) if command is not None else _mm_command()
        """The `mm` to run (another build's, for benchmarks against it: it runs from its home, so
        that no package of this checkout shadows its own)."""
        self.cwd = home if command is not None else None
        self.args = tuple(args)
        self.preexec_fn = preexec_fn
        self.home = home
        self.port = free_port()
        self.verify = verify
        """With TLS on: the client context the start-up probe uses (the URL is then https)."""
        self.url = f"{'https' if verify is not None else 'http'}://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {}), "MODELMORA_HOME": str(home)}
        trio = self.env.get("MODELMORA_BACKEND") == "trio" or "trio" in self.args
        self.grpc_port = free_port() if command is None and not trio and "--grpc-port" not in self.args else 0
        """Where our build serves gRPC (0: none: on trio, or another build's `mm`, run for benchmarks,
        which may not know gRPC)."""
        if self.grpc_port:
            self.grpc_port = int(self.env.setdefault("MODELMORA_GRPC_PORT", str(self.grpc_port)))
        self.log = home / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> ServerProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*self.command, "serve", "--port", str(self.port), *self.args],
                env=self.env,
                cwd=self.cwd,
                preexec_fn=self.preexec_fn,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log.read_text()}")
            try:
                probe = httpx.get(f"{self.url}/health/live", timeout=1, verify=self.verify or True)
                if probe.status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"server did not start:\n{self.log.read_text()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not stop within {timeout_s} s:\n{self.log.read_text()}") from None
