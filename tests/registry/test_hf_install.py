"""`mm install org/name` in process, against `FakeHub`: each model file is a hard link to its blob
in the download cache (stored once), uninstalling or pruning one side leaves the other intact, and
`mm cache prune` keeps the blobs installed versions use."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants
from test_cli import home, run_cli, st_dir

from modelmora.registry import DownloadCache, SQLiteStore

from fakehub import FakeHub

__all__ = ("home", "st_dir")

Cap = pytest.CaptureFixture[str]
MP = pytest.MonkeyPatch
REPO = "acme/tiny-st"


@pytest.fixture
def hub(st_dir: Path, monkeypatch: MP, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """The hub, as the endpoint of this process's `huggingface_hub`, serving `st_dir` as `REPO`."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_ID_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path_factory.mktemp("hf_home") / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with FakeHub() as running:
        running.add_repo(REPO, st_dir)
        # What `huggingface_hub` derives from HF_ENDPOINT at import.
        template = constants.HUGGINGFACE_CO_URL_TEMPLATE.replace(constants.ENDPOINT, running.url, 1)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "ENDPOINT", running.url)
        yield running


def cli(capsys: Cap, monkeypatch: MP, *args: str) -> str:
    code, out, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, err
    return out


def blobs(home: Path) -> set[str]:
    return {p.name for p in (home / "cache" / "downloads" / "blobs").iterdir()}


def test_model_files_are_hard_links_to_the_cache(
    hub: FakeHub, home: Path, st_dir: Path, capsys: Cap, monkeypatch: MP
) -> None:
    cli(capsys, monkeypatch, "install", REPO)
    v = SQLiteStore(home / "registry.sqlite3").get("tiny-st").versions[0]  # type: ignore[union-attr]
    cache = DownloadCache.under(home)
    for name, digest in v.files.items():
        blob = cache.blob(digest)
        assert blob is not None and (Path(v.path) / name).stat().st_ino == blob.stat().st_ino, name
    weights = (st_dir / "model.safetensors").read_bytes()

    cli(capsys, monkeypatch, "uninstall", "tiny-st")
    assert not Path(v.path).exists()
    assert blobs(home) == set(v.files.values())  # the cache keeps its copies
    assert (cache.blob(v.files["model.safetensors"]) or Path()).read_bytes() == weights

    hub.downloads.clear()
    cli(capsys, monkeypatch, "install", REPO)  # from the cache
    assert "model.safetensors" not in hub.downloaded(REPO)
    cli(capsys, monkeypatch, "cache", "prune", "--all")
    assert not (home / "cache" / "downloads" / "blobs").exists() or not blobs(home)
    assert (Path(v.path) / "model.safetensors").read_bytes() == weights  # the model keeps its copy


def test_prune_keeps_the_files_installed_versions_use(home: Path, hub: FakeHub, capsys: Cap, monkeypatch: MP) -> None:
    cli(capsys, monkeypatch, "install", REPO)
    v = SQLiteStore(home / "registry.sqlite3").get("tiny-st").versions[0]  # type: ignore[union-attr]
    kept = blobs(home)
    assert kept == set(v.files.values())

    assert "removed 0 files" in cli(capsys, monkeypatch, "cache", "prune")
    assert blobs(home) == kept
    cli(capsys, monkeypatch, "uninstall", "tiny-st")
    assert f"removed {len(kept)} files" in cli(capsys, monkeypatch, "cache", "prune")
    assert not blobs(home)


def test_a_model_file_changed_in_place_is_not_reused_from_the_cache(
    home: Path, hub: FakeHub, st_dir: Path, capsys: Cap, monkeypatch: MP
) -> None:
    cli(capsys, monkeypatch, "install", REPO)
    v = SQLiteStore(home / "registry.sqlite3").get("tiny-st").versions[0]  # type: ignore[union-attr]
    with (Path(v.path) / "model.safetensors").open("r+b") as f:  # the same inode as the blob
        f.write(b"changed")

    cli(capsys, monkeypatch, "install", REPO, "--version", "2.0.0")

    again = SQLiteStore(home / "registry.sqlite3").get("tiny-st").version_record("2.0.0")  # type: ignore[union-attr]
    assert again is not None and again.files == v.files
    weights = (st_dir / "model.safetensors").read_bytes()
    assert (Path(again.path) / "model.safetensors").read_bytes() == weights
    assert hashlib.sha256(weights).hexdigest() in blobs(home)
