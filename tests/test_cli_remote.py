"""`mm` against a running server (`status`, `health`, `load`, `unload`, and `--url` on the registry
commands), and `mm init`. One server process for the module, its workers running the Echo pipeline."""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from httpfiles import Files, files, model_files, targz
from test_cli import run_cli

from modelmora.config import Settings, load_settings
from modelmora.registry import SQLiteStore, install

from conftest import ECHO_LAYOUT, TESTS_DIR
from serverproc import ServerProcess

__all__ = ("files",)

Cap = pytest.CaptureFixture[str]
MP = pytest.MonkeyPatch


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("remote-home")
    src = tmp_path_factory.mktemp("echo-src")
    (src / "weights.bin").write_bytes(b"\0" * 16)
    for name in ECHO_LAYOUT:
        (src / name).write_text("{}")
    store = SQLiteStore(home / "registry.sqlite3")
    install(store, home, str(src), model_id="echo", task="txt2embed")
    install(store, home, str(src), model_id="echo", task="txt2embed", version="1.1.0")
    store.close()
    env = {
        "MODELMORA_ZYGOTE": "false",
        "MODELMORA_PIPELINES__TXT2EMBED": "worker_pipelines:Echo",
        "MODELMORA_ALLOW_PRIVATE_URLS": "true",
        "MODELMORA_KEEP_ALIVE": "-1",
        "MODELMORA_TORCH_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p),
    }
    srv = ServerProcess(home, env).start()
    yield srv
    srv.stop()


@pytest.fixture
def local_home(tmp_path: Path, monkeypatch: MP) -> Path:
    """The CLI's own home (not the server's): --url commands must not touch it."""
    for key in [k for k in os.environ if k.startswith("MODELMORA_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MODELMORA_HOME", str(tmp_path / "cli-home"))
    return tmp_path / "cli-home"


def cli(capsys: Cap, monkeypatch: MP, *args: str) -> str:
    code, out, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, err
    return out


def cli_error(capsys: Cap, monkeypatch: MP, *args: str) -> str:
    code, out, err = run_cli(capsys, monkeypatch, *args)
    assert code == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow
def test_status_health_load_unload(server: ServerProcess, local_home: Path, capsys: Cap, monkeypatch: MP) -> None:
    url = ("--url", server.url)
    assert f"server {server.url}: ready" in cli(capsys, monkeypatch, "health", *url)
    out = cli(capsys, monkeypatch, "load", "echo@1.1.0", *url)
    assert re.search(r"echo@1\.1\.0: ready \(worker \d+\)", out), out
    out = cli(capsys, monkeypatch, "status", *url)
    assert "echo" in out and "1.1.0" in out and "ready" in out
    models = json.loads(cli(capsys, monkeypatch, "status", "--json", *url))["models"]
    assert {(m["version"], m["state"]) for m in models} >= {("1.1.0", "ready")}
    assert "echo@1.1.0: cached" in cli(capsys, monkeypatch, "unload", "echo@1.1.0", *url)
    health = json.loads(cli(capsys, monkeypatch, "health", "--json", *url))
    assert health["ready"] and all(m["healthy"] for m in health["models"])

    line = cli_error(capsys, monkeypatch, "load", "nope", *url)
    assert "model 'nope' is not installed [HTTP 404 model_not_found]" in line
    assert "cannot reach the server at http://127.0.0.1:1" in cli_error(
        capsys, monkeypatch, "health", "--url", "http://127.0.0.1:1"
    )
    assert not local_home.exists()  # nothing local was opened


@pytest.mark.slow
def test_health_fails_for_an_unhealthy_model(
    server: ServerProcess, local_home: Path, tmp_path: Path, capsys: Cap, monkeypatch: MP
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "FAIL_LOAD").write_text("")
    store = SQLiteStore(server.home / "registry.sqlite3")
    install(store, server.home, str(broken), model_id="broken", task="txt2embed", check_files=False)
    url = ("--url", server.url)
    try:
        assert "[HTTP 503 model_load_failed]" in cli_error(capsys, monkeypatch, "load", "broken", *url)
        code, out, err = run_cli(capsys, monkeypatch, "health", *url)
        assert code == 1 and "broken" in out and "unhealthy: broken@1.0.0" in err
    finally:
        cli(capsys, monkeypatch, "uninstall", "broken", "--force", *url)
        store.close()


@pytest.mark.slow
def test_registry_commands_with_url(
    server: ServerProcess, local_home: Path, files: Files, tmp_path: Path, capsys: Cap, monkeypatch: MP
) -> None:
    url = ("--url", server.url)
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(b"\1" * 8)
    for name in ECHO_LAYOUT:
        (src / name).write_text("{}")
    files.files["/remote-m.tar.gz"] = targz(model_files(src))
    out = cli(capsys, monkeypatch, "install", files.url("/remote-m.tar.gz"), "--task", "txt2embed", "--name", "R", *url)
    assert f"installed remote-m 1.0.0 (txt2embed, 6 files, 0.0 MiB) from {files.url('/remote-m.tar.gz')}" in out
    out = cli(capsys, monkeypatch, "install", files.url("/remote-m.tar.gz"), "--version", "2.0.0", *url)
    assert "installed remote-m 2.0.0" in out

    out = cli(capsys, monkeypatch, "list", *url)
    assert "remote-m" in out and "echo" in out and "1.0.0, 2.0.0" in out
    listed = json.loads(cli(capsys, monkeypatch, "list", "--json", "--task", "txt2embed", *url))
    assert {m["id"] for m in listed} >= {"echo", "remote-m"}
    info = json.loads(cli(capsys, monkeypatch, "info", "remote-m", "--json", *url))
    assert info["metadata"]["display_name"] == "R" and info["versions"][0]["checksums"]["weights.bin"]
    assert "active version 2.0.0 (was 1.0.0)" in cli(capsys, monkeypatch, "activate", "remote-m", "2.0.0", *url)
    assert "uninstalled remote-m 1.0.0 (left: 2.0.0)" in cli(capsys, monkeypatch, "uninstall", "remote-m@1.0.0", *url)
    assert "uninstalled remote-m (2.0.0)" in cli(capsys, monkeypatch, "uninstall", "remote-m", *url)

    line = cli_error(capsys, monkeypatch, "install", "./local/dir", *url)
    assert "local paths are not installed over the API" in line and "($.source)" in line
    line = cli_error(capsys, monkeypatch, "install", files.url("/gone.tar.gz"), "--task", "txt2embed", *url)
    assert "HTTP 404" in line and "[model_not_found]" in line
    assert "[HTTP 404 model_not_found]" in cli_error(capsys, monkeypatch, "info", "nope", *url)
    assert not local_home.exists()


def test_init_writes_every_setting_at_its_default(tmp_path: Path, capsys: Cap, monkeypatch: MP) -> None:
    monkeypatch.setenv("MODELMORA_HOME", str(tmp_path / "home"))
    out = cli(capsys, monkeypatch, "init")
    path = tmp_path / "home" / "config.toml"
    assert f"wrote {path}" in out
    text = path.read_text()
    assert load_settings(path, environ={}) == Settings()  # all commented out
    for field in Settings.__struct_fields__:
        assert f"# {field} = " in text or f"[{field}]" in text, field
    # every line with a value, uncommented, gives the defaults back
    uncommented = re.sub(r"(?m)^# (\w+ = (?!\(unset\)).*)$", r"\1", text)
    assert tomllib.loads(uncommented)["port"] == 8000
    assert load_settings(_write(tmp_path / "all.toml", uncommented), environ={}) == Settings()

    assert "exists: pass --force" in cli_error(capsys, monkeypatch, "init")
    assert "wrote" in cli(capsys, monkeypatch, "init", "--force")
    other = tmp_path / "etc" / "mm.toml"
    assert f"wrote {other}" in cli(capsys, monkeypatch, "init", "--config", str(other))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
