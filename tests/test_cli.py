"""The `mm` CLI on the registry: install, list, info, uninstall (in process and as a subprocess)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelmora.cli import main
from modelmora.registry import SQLiteStore
from modelmora.tasks import TaskType

from fakehub import FakeHub
from serverproc import mm


def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setenv("COLUMNS", "250")
    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    for key in [k for k in __import__("os").environ if k.startswith("MODELMORA_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MODELMORA_HOME", str(h))
    return h


@pytest.fixture
def st_dir(tmp_path: Path) -> Path:
    """A small sentence-transformers-shaped directory (the task is detectable)."""
    d = tmp_path / "my-model"
    (d / "1_Pooling").mkdir(parents=True)
    (d / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "x"}]))
    (d / "config.json").write_text("{}")
    (d / "1_Pooling" / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    return d


def test_install_list_info_uninstall(
    home: Path, st_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run_cli(capsys, monkeypatch, "install", str(st_dir))
    assert code == 0, out
    assert "installed my-model 1.0.0 (txt2embed, 4 files" in out
    copy = home / "models" / "my-model" / "1.0.0"
    assert (copy / "1_Pooling" / "config.json").is_file()
    assert (copy / "model.safetensors").read_bytes() == (st_dir / "model.safetensors").read_bytes()

    code, out, _ = run_cli(capsys, monkeypatch, "list")
    assert code == 0 and "my-model" in out and "txt2embed" in out and "1.0.0" in out

    code, out, _ = run_cli(capsys, monkeypatch, "info", "my-model")
    want = hashlib.sha256((st_dir / "model.safetensors").read_bytes()).hexdigest()
    assert code == 0 and want in out and "model.safetensors" in out

    code, out, _ = run_cli(capsys, monkeypatch, "uninstall", "my-model")
    assert code == 0 and "uninstalled my-model" in out
    assert not (home / "models" / "my-model").exists()
    assert (st_dir / "model.safetensors").is_file()  # the user's directory is never touched
    code, out, _ = run_cli(capsys, monkeypatch, "list")
    assert "no models installed" in out


def test_versions_force_and_conflicts(
    home: Path, st_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_cli(capsys, monkeypatch, "install", str(st_dir), "--id", "m")[0] == 0
    code, _, err = run_cli(capsys, monkeypatch, "install", str(st_dir), "--id", "m")
    assert code == 1 and "already installed" in err and "--force" in err
    assert run_cli(capsys, monkeypatch, "install", str(st_dir), "--id", "m", "--force")[0] == 0
    assert run_cli(capsys, monkeypatch, "install", str(st_dir), "--id", "m", "--version", "1.1.0")[0] == 0
    rec = SQLiteStore(home / "registry.sqlite3").get("m")
    assert rec is not None and rec.active_version == "1.0.0"
    assert [v.version for v in rec.versions] == ["1.0.0", "1.1.0"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "modules.json").write_text("[]")
    code, _, err = run_cli(capsys, monkeypatch, "install", str(other), "--id", "m")
    assert code == 1 and str(st_dir) in err and str(other) in err  # names both sources


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["install", "/definitely/not/here"], "does not exist"),
        (["install", "s3://bucket"], "an s3:// source is s3://bucket/prefix"),
        (["install", "just-a-word"], "neither a local path"),
        (["install", "{src}", "--id", "bad id!"], "model id"),
        (["install", "{src}", "--version", "one"], "semantic version"),
        (["install", "{plain}"], "--task"),
        (["info", "nope"], "not installed"),
        (["uninstall", "nope"], "not installed"),
    ],
)
def test_errors_are_one_clear_line(
    home: Path,
    st_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    needle: str,
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "weights.bin").write_bytes(b"x")
    args = [a.format(src=st_dir, plain=plain) for a in args]
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert code == 1
    assert needle in err and "Traceback" not in err
    assert not list((home / "models").glob(".staging-*")) if (home / "models").exists() else True


def test_bad_configuration_is_reported(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELMORA_NO_SUCH_KEY", "1")
    code, _, err = run_cli(capsys, monkeypatch, "list")
    assert code == 1 and "MODELMORA_NO_SUCH_KEY" in err


def test_install_from_hugging_face(tmp_path: Path, minilm_path: Path) -> None:
    """`mm install org/name` in a subprocess, against a local hub endpoint (HF_ENDPOINT)."""
    home = tmp_path / "home"
    with FakeHub() as hub:
        sha = hub.add_repo("sentence-transformers/all-MiniLM-L6-v2", minilm_path)
        env = hub.subprocess_env(tmp_path / "hf")
        env.pop("MODELMORA_HOME", None)
        proc = mm("install", "sentence-transformers/all-MiniLM-L6-v2", home=home, env=env)
        assert "installed all-MiniLM-L6-v2 1.0.0 (txt2embed" in proc.stdout
        fetched = hub.downloaded("sentence-transformers/all-MiniLM-L6-v2")
        assert "model.safetensors" in fetched and "README.md" not in fetched
        rec = SQLiteStore(home / "registry.sqlite3").get("all-MiniLM-L6-v2")
        assert rec is not None and rec.source == "sentence-transformers/all-MiniLM-L6-v2"
        v = rec.versions[0]
        assert v.revision == sha
        for name, digest in v.files.items():
            assert hashlib.sha256((minilm_path / name).read_bytes()).hexdigest() == digest
        bad = mm("install", "sentence-transformers/nope", home=home, env=env, check=False)
        assert bad.returncode == 1 and "sentence-transformers/nope" in bad.stderr and "Traceback" not in bad.stderr


def test_set_changes_model_settings(
    home: Path, st_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_cli(capsys, monkeypatch, "install", str(st_dir), "--id", "m")[0] == 0
    code, out, _ = run_cli(capsys, monkeypatch, "set", "m", "--pinned", "--keep-alive", "10m", "--max-batch-size", "8")
    assert code == 0 and "keep_alive=10m" in out and "pinned=True" in out
    code, out, _ = run_cli(capsys, monkeypatch, "set", "m", "--preload")
    rec = SQLiteStore(home / "registry.sqlite3").get("m")
    assert rec is not None
    assert rec.settings == {"pinned": True, "keep_alive": "10m", "max_batch_size": 8, "preload": True}
    code, _, err = run_cli(capsys, monkeypatch, "set", "m", "--keep-alive", "soon")
    assert code == 1 and "keep_alive" in err
    code, _, err = run_cli(capsys, monkeypatch, "set", "m", "--max-batch-size", "0")
    assert code == 1 and "max_batch_size" in err
    code, out, _ = run_cli(capsys, monkeypatch, "set", "m", "--reset")
    assert code == 0 and "server defaults" in out
    code, _, err = run_cli(capsys, monkeypatch, "set", "nope", "--pinned")
    assert code == 1 and "not installed" in err


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _serve_fails(home: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """`mm serve ARGS` in a subprocess: it must exit 2 with one line on stderr, and no traceback."""
    env = {"MODELMORA_ZYGOTE": "false", "MODELMORA_GRPC_PORT": "0", **(env or {})}
    proc = mm("serve", *args, home=home, env=env, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_serve_start_up_failures_are_one_line_and_exit_2(tmp_path: Path, busy_port: int) -> None:
    home = tmp_path / "home"
    assert f"cannot listen on 127.0.0.1:{busy_port}: Address already in use" in _serve_fails(
        home, "--port", str(busy_port)
    )
    assert "port must be an integer <= 65535 (got 99999" in _serve_fails(home, "--port", "99999")
    assert "log_level must be one of" in _serve_fails(home, "--port", "0", env={"MODELMORA_LOG_LEVEL": "loud"})
    line = _serve_fails(home, "--port", "0", "--backend", "trio", env={"MODELMORA_RESULT_STORE": "s3"})
    assert "result_store = 's3' runs only on the asyncio backend" in line
    assert "cannot open the registry nosuch://x" in _serve_fails(
        home, "--port", "0", env={"MODELMORA_REGISTRY_URL": "nosuch://x"}
    )
    line = _serve_fails(home, "--port", "0", "--grpc-port", str(busy_port))
    assert f"cannot listen on 127.0.0.1:{busy_port}: Address already in use" in line
    line = _serve_fails(home, "--port", "0", "--backend", "trio", "--grpc-port", "50051")
    assert "gRPC (grpc_port = 50051) runs only on the asyncio backend: set grpc_port = 0" in line


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_serve_with_a_read_only_home_is_one_line(tmp_path: Path) -> None:
    """A home on a read-only file system (a read-only bind mount in a private mount namespace),
    no result secret yet: one line naming the result store and the file system, exit 2."""
    home = tmp_path / "home"
    home.mkdir()
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no permission for a private mount namespace")
    script = f'mount --bind -o ro "{home}" "{home}" && exec "{sys.executable}" -m modelmora serve --port 0'
    env = {
        **os.environ,
        "MODELMORA_HOME": str(home),
        "MODELMORA_REGISTRY_URL": f"sqlite:///{tmp_path / 'registry.sqlite3'}",
        "MODELMORA_ZYGOTE": "false",
        "MODELMORA_GRPC_PORT": "0",
    }
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "cannot open the result store" in proc.stderr and "Read-only file system" in proc.stderr


def test_install_refuses_a_model_in_a_subfolder_and_names_it(
    home: Path, minilm_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "download"
    shutil.copytree(minilm_path, src / "sub")
    code, _, err = run_cli(capsys, monkeypatch, "install", str(src))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "no modules.json" in err and f"found modules.json (txt2embed) in sub/: install {src}/sub" in err
    assert SQLiteStore(home / "registry.sqlite3").list() == []
    assert run_cli(capsys, monkeypatch, "install", f"{src}/sub")[0] == 0


def test_install_checks_the_given_task_and_no_check_skips_it(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "weights.bin").write_bytes(b"x")
    code, _, err = run_cli(capsys, monkeypatch, "install", str(bare), "--task", "img2embed")
    assert code == 1 and "not laid out as a model for img2embed: no config.json" in err
    code, out, _ = run_cli(capsys, monkeypatch, "install", str(bare), "--task", "img2embed", "--no-check")
    assert code == 0 and "(img2embed, 1 files" in out


def test_task_choices_come_from_the_task_table(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run_cli(capsys, monkeypatch, "install", "--help")
    assert code == 0
    listed = out[out.index("choices:") :]
    for task in TaskType:
        assert task.value in listed
        assert run_cli(capsys, monkeypatch, "list", "--task", task.value)[0] == 0
    code, _, err = run_cli(capsys, monkeypatch, "list", "--task", "txt2vec")
    assert code != 0 and "txt2vec" in err and "Traceback" not in err


def _one_line_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    code, out, err = run_cli(capsys, monkeypatch, *args)
    assert code == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


COMMANDS = [["list"], ["info", "m"], ["uninstall", "m"], ["set", "m", "--pinned"], ["install", "{src}"]]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: a[0])
def test_an_unsupported_registry_url_is_one_line(
    home: Path,
    st_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
) -> None:
    monkeypatch.setenv("MODELMORA_REGISTRY_URL", "mysql://user:secret@db/modelmora")
    line = _one_line_error(capsys, monkeypatch, *[a.format(src=st_dir) for a in args])
    assert "cannot open the registry mysql://***@db/modelmora: unsupported registry_url" in line


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: a[0])
def test_a_home_that_cannot_be_used_is_one_line(
    home: Path,
    st_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
) -> None:
    home.parent.mkdir(parents=True, exist_ok=True)
    home.write_text("a file, not a folder")
    line = _one_line_error(capsys, monkeypatch, *[a.format(src=st_dir) for a in args])
    assert f"cannot open the registry {home}" in line


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: a[0])
def test_a_registry_that_is_not_a_database_is_one_line(
    home: Path,
    st_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
) -> None:
    home.mkdir(parents=True)
    (home / "registry.sqlite3").write_bytes(b"not sqlite " * 100)
    line = _one_line_error(capsys, monkeypatch, *[a.format(src=st_dir) for a in args])
    assert "file is not a database" in line


def test_a_bad_config_file_is_one_line(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "mm.toml"
    config.write_text("log_level = 3\n")
    assert "log_level" in _one_line_error(capsys, monkeypatch, "list", "--config", str(config))
    assert "cannot read config file" in _one_line_error(capsys, monkeypatch, "list", "--config", str(tmp_path / "no"))


def test_install_from_hugging_face_checks_the_download(tmp_path: Path, minilm_path: Path) -> None:
    """A repo whose model sits in a subfolder is refused after the download, before it is registered."""
    home = tmp_path / "home"
    nested = tmp_path / "nested"
    shutil.copytree(minilm_path, nested / "model")
    (nested / "README.md").write_text("weights in model/\n")
    with FakeHub() as hub:
        hub.add_repo("acme/nested", nested)
        env = hub.subprocess_env(tmp_path / "hf")
        proc = mm("install", "acme/nested", home=home, env=env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "found modules.json (txt2embed) in model/ of the repo" in proc.stderr
    assert SQLiteStore(home / "registry.sqlite3").list() == []
    assert [p.name for p in (home / "models").iterdir()] == []
