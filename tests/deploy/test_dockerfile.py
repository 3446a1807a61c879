"""deploy/Dockerfile linted (hadolint) and parsed: two stages, the locked install, a non-root user,
tini, the server's ports, the home on a volume, a health check on the live endpoint; and the health
check script itself against a stand-in server. Building and running the image is `just image-test`."""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import shlex
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from modelmora.config import DEFAULT_GRPC_PORT, Settings

from .k8s_checks import DEPLOY, IMAGE_UID, OPEN_GET_ROUTES, ROOT

DOCKERFILE = DEPLOY / "Dockerfile"
HEALTHCHECK = DEPLOY / "healthcheck.py"


def instructions() -> list[tuple[str, str]]:
    parser = DockerfileParser(path=str(DOCKERFILE))
    return [(i["instruction"], i["value"]) for i in parser.structure if i["instruction"] != "COMMENT"]


def stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions by stage name (FROM ... AS name)."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for instruction, value in instructions():
        if instruction == "FROM":
            current = out.setdefault(value.split()[-1], [])
        elif current is not None:
            current.append((instruction, value))
    return out


def values(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    return [v for i, v in stage if i == instruction]


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"
    proc = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_builder_stage_installs_the_lock_and_the_runtime_stage_copies_only_its_environment() -> None:
    parsed = stages()
    assert list(parsed) == ["builder", "runtime"]
    froms = [v for i, v in instructions() if i == "FROM"]
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE} AS runtime"]  # one base, an ARG (offline builds)
    builder, runtime = parsed["builder"], parsed["runtime"]
    assert any("uv.lock" in v for v in values(builder, "COPY"))
    runs = " ".join(values(builder, "RUN"))
    assert "modelmora-sync deps" in runs and "modelmora-sync project" in runs
    sync = (DEPLOY / "sync.sh").read_text()
    assert sync.count("uv sync --locked --no-dev") == 2  # both steps install exactly the lock
    copies = values(runtime, "COPY")
    assert "--from=builder /app/.venv /app/.venv" in copies
    assert all(c.startswith(("--from=builder", "deploy/healthcheck.py")) for c in copies)
    assert "VARIANT=cpu" in values(builder, "ARG")


def test_the_runtime_runs_the_server_as_a_non_root_user_under_tini() -> None:
    runtime = stages()["runtime"]
    (user,) = values(runtime, "USER")
    assert user == f"{IMAGE_UID}:{IMAGE_UID}"  # numeric: runAsNonRoot can check it
    assert json.loads(values(runtime, "ENTRYPOINT")[-1]) == ["/usr/bin/tini", "--"]
    assert json.loads(values(runtime, "CMD")[-1]) == ["mm", "serve"]
    assert "tini" in " ".join(values(runtime, "RUN"))


def test_the_home_is_a_volume_and_the_ports_are_the_servers() -> None:
    runtime = stages()["runtime"]
    env = dict(
        item.split("=", 1) for value in values(runtime, "ENV") for item in shlex.split(value.replace("\\\n", " "))
    )
    (volume,) = values(runtime, "VOLUME")
    assert json.loads(volume) == [env["MODELMORA_HOME"]]
    assert env["MODELMORA_HOST"] == "0.0.0.0"
    (expose,) = values(runtime, "EXPOSE")
    assert expose.split() == [str(Settings().port), str(DEFAULT_GRPC_PORT)]


def test_the_health_check_asks_the_live_endpoint() -> None:
    (healthcheck,) = values(stages()["runtime"], "HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD")
    assert json.loads(command) == ["python", "/app/healthcheck.py"]
    assert "--start-period" in options
    assert f"LIVE_PATH = {'/health/live'!r}" in HEALTHCHECK.read_text().replace('"', "'")
    assert "/health/live" in OPEN_GET_ROUTES


def _excluded(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` (or the folder above it) out of the build context."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            excluded = not negate
    return excluded


def test_every_file_the_build_copies_is_in_the_build_context() -> None:
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    sources: list[str] = []
    for instruction, value in instructions():
        if instruction == "COPY" and not value.startswith("--from"):
            sources.extend(value.split()[:-1])
        if instruction == "RUN":
            sources.extend(part.split("source=")[1].split(",")[0] for part in value.split() if "source=" in part)
    assert "deploy/wheels" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _excluded(source, patterns), source
    assert _excluded(".venv", patterns) and _excluded("tests", patterns) and _excluded(".git", patterns)


def test_the_install_step_refuses_an_unknown_variant() -> None:
    proc = subprocess.run(
        ["bash", str(DEPLOY / "sync.sh"), "deps", "rocm"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and "VARIANT must be cpu or cuda" in proc.stderr


class _Probe(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []  # noqa: RUF012 - one stand-in server per test

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def stand_in(status: int) -> Iterator[int]:
    handler = type("Probe", (_Probe,), {"status": status, "paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        assert handler.paths in ([], ["/health/live"])


def run_healthcheck(port: int, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
    env.update(MODELMORA_HOME=str(tmp_path), MODELMORA_HOST="0.0.0.0", MODELMORA_PORT=str(port))
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(("status", "code"), [(200, 0), (503, 1)])
def test_the_health_check_script_follows_the_configured_port(tmp_path: Path, status: int, code: int) -> None:
    with stand_in(status) as port:
        proc = run_healthcheck(port, tmp_path)
    assert proc.returncode == code, proc.stderr
    assert (proc.stderr == "") == (code == 0)


def test_the_health_check_script_fails_in_one_line_when_nothing_listens(tmp_path: Path) -> None:
    with stand_in(200) as port:
        pass  # closed: nothing listens there now
    proc = run_healthcheck(port, tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("unhealthy: http://127.0.0.1:")


def test_the_health_check_script_refuses_a_configuration_the_server_would_refuse(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
    env.update(MODELMORA_HOME=str(tmp_path), MODELMORA_PORT="eighty")
    proc = subprocess.run(
        [sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 1 and proc.stderr.startswith("unhealthy: invalid configuration: port")
