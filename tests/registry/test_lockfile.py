"""modelmora.lock: `mm lock` writes the registry pinned; `mm install` with no argument installs
exactly that and checks every checksum; `--frozen` never changes the lock; a bad lock file is one
line naming the field."""

from __future__ import annotations

import hashlib
import shutil
import tomllib
from pathlib import Path

import pytest
from test_cli import home, run_cli, st_dir

from modelmora.registry import SQLiteStore, lock_from, read_lock, render_lock
from modelmora.registry.lockfile import LockFile

from fakehub import FakeHub
from serverproc import mm

__all__ = ("home", "st_dir")

Cap = pytest.CaptureFixture[str]
MP = pytest.MonkeyPatch


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


def registry(home: Path) -> SQLiteStore:
    return SQLiteStore(home / "registry.sqlite3")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: MP) -> Path:
    """The current directory, where modelmora.lock is read and written."""
    d = tmp_path / "project"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


def install_two(capsys: Cap, monkeypatch: MP, st_dir: Path) -> None:
    cli(capsys, monkeypatch, "install", str(st_dir), "--id", "a", "--name", "A", "--param", "x=null")
    cli(capsys, monkeypatch, "install", str(st_dir), "--id", "a", "--version", "1.1.0")
    cli(capsys, monkeypatch, "activate", "a", "1.1.0", "--pin")
    cli(capsys, monkeypatch, "set", "a", "--keep-alive", "10m", "--max-batch-size", "4")
    cli(capsys, monkeypatch, "install", str(st_dir), "--id", "b", "--task", "txt2embed", "--version", "0.1.0")


def test_lock_round_trip(home: Path, st_dir: Path, project: Path, capsys: Cap, monkeypatch: MP) -> None:
    """Lock, wipe the registry and the files, install from the lock: identical checksums, active
    versions, pins, settings and metadata."""
    install_two(capsys, monkeypatch, st_dir)
    before = registry(home).list()
    assert "wrote" in cli(capsys, monkeypatch, "lock") and (project / "modelmora.lock").is_file()
    text = (project / "modelmora.lock").read_text()
    data = tomllib.loads(text)
    assert [m["id"] for m in data["models"]] == ["a", "b"]
    assert (
        data["models"][0]["versions"][1]["files"]["model.safetensors"]
        == hashlib.sha256((st_dir / "model.safetensors").read_bytes()).hexdigest()
    )
    assert read_lock(project / "modelmora.lock") == lock_from(before)
    assert "is up to date" in cli(capsys, monkeypatch, "lock", "--check")

    shutil.rmtree(home)
    out = cli(capsys, monkeypatch, "install")
    assert "3 installed" in out
    after = registry(home).list()
    assert [(r.id, r.active_version, r.active_pinned, r.settings, r.metadata) for r in after] == [
        (r.id, r.active_version, r.active_pinned, r.settings, r.metadata) for r in before
    ]
    assert [[v.files for v in r.versions] for r in after] == [[v.files for v in r.versions] for r in before]
    assert (project / "modelmora.lock").read_text() == text  # nothing to resolve: unchanged

    out = cli(capsys, monkeypatch, "install", "--frozen")
    assert "0 installed; 3 already installed and verified" in out

    cli(capsys, monkeypatch, "install", str(st_dir), "--id", "c")
    assert "out of date" in cli_error(capsys, monkeypatch, "lock", "--check")


def test_install_from_the_lock_checks_every_checksum(
    home: Path, st_dir: Path, project: Path, capsys: Cap, monkeypatch: MP
) -> None:
    cli(capsys, monkeypatch, "install", str(st_dir), "--id", "a")
    cli(capsys, monkeypatch, "lock")
    installed = home / "models" / "a" / "1.0.0" / "model.safetensors"
    installed.write_bytes(b"changed" + installed.read_bytes()[7:])  # the installed copy tampered with
    line = cli_error(capsys, monkeypatch, "install")
    assert "model 'a' version 1.0.0: checksum mismatch in model.safetensors" in line

    shutil.rmtree(home)  # the source changed since the lock was written: refused, nothing registered
    (st_dir / "config.json").write_text('{"changed": true}')
    line = cli_error(capsys, monkeypatch, "install")
    assert "checksum mismatch in config.json" in line and "differs from the pinned" in line
    assert registry(home).list() == []
    assert not any((home / "models").iterdir())
    (st_dir / "extra.txt").write_text("x")
    (st_dir / "config.json").write_text("{}")
    assert "the source has extra.txt, which is not pinned" in cli_error(capsys, monkeypatch, "install")


def test_a_version_installed_otherwise_than_pinned(
    home: Path, st_dir: Path, project: Path, capsys: Cap, monkeypatch: MP
) -> None:
    cli(capsys, monkeypatch, "install", str(st_dir), "--id", "a")
    cli(capsys, monkeypatch, "lock")
    (st_dir / "config.json").write_text('{"v": 2}')
    cli(capsys, monkeypatch, "install", str(st_dir), "--id", "a", "--force")  # the registry moved on
    line = cli_error(capsys, monkeypatch, "install")
    assert "a@1.0.0 is installed with other files than the lock pins (config.json)" in line
    (st_dir / "config.json").write_text("{}")
    assert "1 installed" in cli(capsys, monkeypatch, "install", "--force")  # back to what the lock pins
    assert (
        registry(home).get("a").versions[0].files == read_lock(project / "modelmora.lock").models[0].versions[0].files
    )  # type: ignore[union-attr]


def test_an_entry_without_checksums_is_resolved_unless_frozen(
    home: Path, st_dir: Path, project: Path, capsys: Cap, monkeypatch: MP
) -> None:
    lock = project / "modelmora.lock"
    lock.write_text(
        f'lock_version = 1\n[[models]]\nid = "hand"\ntask = "txt2embed"\nsource = "file://{st_dir}"\n'
        'active_version = "2.0.0"\n[[models.versions]]\nversion = "2.0.0"\n'
    )
    line = cli_error(capsys, monkeypatch, "install", "--frozen")
    assert "no checksums for hand@2.0.0" in line and "without --frozen" in line
    assert "no checksums" not in lock.read_text() and "files" not in lock.read_text()  # unchanged
    out = cli(capsys, monkeypatch, "install")
    assert "1 installed" in out and "1 resolved into modelmora.lock" in out
    pinned = read_lock(lock).models[0].versions[0].files
    assert pinned == registry(home).get("hand").versions[0].files  # type: ignore[union-attr]
    assert "3 installed" not in cli(capsys, monkeypatch, "install", "--frozen")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("lock_version = [", "is not valid TOML"),
        ("lock_version = 7", "lock_version: expected `int` <= 1"),
        ("colour = 1", "colour: unknown field"),
        ('[[models]]\nid = "a b"\ntask = "t"\nsource = "s"\nactive_version = "1.0.0"\n'
         '[[models.versions]]\nversion = "1.0.0"', "models[0].id: expected `str` matching"),
        ('[[models]]\nid = "a"\ntask = "t"\nsource = "s"\nactive_version = "1.0.0"\n'
         '[[models.versions]]\nversion = "1.0.0"\n[models.versions.files]\n"w.bin" = "nothex"',
         "models[0].versions[0].files"),
        ('[[models]]\nid = "a"\ntask = "t"\nsource = "s"\nactive_version = "2.0.0"\n'
         '[[models.versions]]\nversion = "1.0.0"', "active_version 2.0.0 is not one of its versions"),
        ('[[models]]\nid = "a"\ntask = "t"\nsource = "s"\nactive_version = "1.0.0"\nversions = []',
         "models[0].versions: expected `array` of length >= 1"),
    ],
)  # fmt: skip
def test_a_bad_lock_file_is_one_line(
    home: Path, project: Path, capsys: Cap, monkeypatch: MP, text: str, needle: str
) -> None:
    (project / "modelmora.lock").write_text(text + "\n")
    line = cli_error(capsys, monkeypatch, "install")
    assert needle in line and "modelmora.lock" in line


def test_lock_command_errors(home: Path, st_dir: Path, project: Path, capsys: Cap, monkeypatch: MP) -> None:
    assert "no lock file at" in cli_error(capsys, monkeypatch, "install")
    assert "does not exist: run mm lock" in cli_error(capsys, monkeypatch, "lock", "--check")
    assert "give no SOURCE" in cli_error(capsys, monkeypatch, "install", str(st_dir), "--frozen")
    other = project / "sub" / "pins.lock"
    other.parent.mkdir()
    cli(capsys, monkeypatch, "install", str(st_dir), "--id", "a")
    cli(capsys, monkeypatch, "lock", "--lockfile", str(other))
    assert read_lock(other).models[0].id == "a"
    assert render_lock(LockFile()) == render_lock(read_lock(_empty(project)))


def _empty(project: Path) -> Path:
    path = project / "empty.lock"
    path.write_text(render_lock(LockFile()))
    return path


def test_lock_round_trip_from_hugging_face(tmp_path: Path, minilm_path: Path) -> None:
    """A Hugging Face install pinned at its commit: wiped, installed again from the lock through the
    hub, identical revision and checksums (the CLI in a subprocess, HF_ENDPOINT at a local hub)."""
    home, project = tmp_path / "home", tmp_path / "project"
    project.mkdir()
    with FakeHub() as hub:
        sha = hub.add_repo("sentence-transformers/all-MiniLM-L6-v2", minilm_path)
        env = hub.subprocess_env(tmp_path / "hf")
        env.pop("MODELMORA_HOME", None)
        mm("install", "sentence-transformers/all-MiniLM-L6-v2", home=home, env=env)
        before = SQLiteStore(home / "registry.sqlite3").list()
        mm("lock", "--lockfile", str(project / "modelmora.lock"), home=home, env=env)
        shutil.rmtree(home)
        proc = mm("install", "--lockfile", str(project / "modelmora.lock"), "--frozen", home=home, env=env)
        assert "1 installed" in proc.stdout
    after = SQLiteStore(home / "registry.sqlite3").list()
    assert after[0].versions[0].revision == sha == before[0].versions[0].revision
    assert after[0].versions[0].files == before[0].versions[0].files
