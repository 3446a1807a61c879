"""Hugging Face sources through the install path (`sources.download_hf`) against `FakeHub`, a
real HTTP server: the files fetched at a commit, and every way the Hub can fail turned into the
registry's errors, with a message naming the repo."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from huggingface_hub import constants

from modelmora.errors import ModelNotFound, SourceError
from modelmora.registry import DownloadCache, SourceLimits, parse_source
from modelmora.registry.sources import download_hf

from fakehub import FakeHub

TINY = "acme/tiny"


@pytest.fixture(autouse=True)
def _isolated_hf(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the developer's token and offline setting out of the way."""
    home = tmp_path_factory.mktemp("hf_home")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_ID_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub reads these settings from the environment at import time.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A small repo with a nested file, a file the loader does not need and LFS-stored weights."""
    root = tmp_path / "tiny-src"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"hidden_size": 4}')
    (root / "sub" / "extra.txt").write_text("nested\n")
    (root / "README.md").write_text("# tiny\n")
    (root / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    return root


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below `root`."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def fetch(hub: FakeHub, source: str, dest: Path) -> str:
    return download_hf(
        parse_source(source), dest, DownloadCache(dest.parent / "cache"), SourceLimits(), endpoint=hub.url
    )


def test_the_files_at_a_commit(tiny_dir: Path, tmp_path: Path) -> None:
    with FakeHub() as hub:
        sha = hub.add_repo(TINY, tiny_dir, revision_sha="ab" * 20)
        commit = fetch(hub, f"{TINY}@{sha}", tmp_path / "dest")
    assert commit == sha == "ab" * 20
    expected = {k: v for k, v in _tree(tiny_dir).items() if k != "README.md"}
    assert _tree(tmp_path / "dest") == expected
    assert not any(p.is_symlink() for p in (tmp_path / "dest").rglob("*"))


def test_pytorch_weights_only_when_there_are_no_safetensors(tiny_dir: Path, tmp_path: Path) -> None:
    (tiny_dir / "model.safetensors").rename(tiny_dir / "pytorch_model.bin")
    with FakeHub() as hub:
        hub.add_repo(TINY, tiny_dir)
        fetch(hub, TINY, tmp_path / "dest")
    assert "pytorch_model.bin" in _tree(tmp_path / "dest")


def test_unknown_repo_and_revision_are_not_found(tiny_dir: Path, tmp_path: Path) -> None:
    with FakeHub() as hub:
        hub.add_repo(TINY, tiny_dir)
        with pytest.raises(ModelNotFound, match="'nobody/nothing' not found") as excinfo:
            fetch(hub, "nobody/nothing", tmp_path / "a")
        assert excinfo.value.field == "source"
        with pytest.raises(ModelNotFound, match="revision 'v9' not found in 'acme/tiny'"):
            fetch(hub, f"{TINY}@v9", tmp_path / "b")
        with pytest.raises(ModelNotFound, match="not found in 'acme/tiny'"):
            fetch(hub, f"{TINY}@{'0' * 40}", tmp_path / "c")


def test_a_stopped_hub_is_a_source_error(tiny_dir: Path, tmp_path: Path) -> None:
    with FakeHub() as hub:
        hub.add_repo(TINY, tiny_dir)
    # Stopped: the port is closed, connections are refused.
    with pytest.raises(SourceError, match="cannot reach the Hub") as excinfo:
        fetch(hub, TINY, tmp_path / "dest")
    assert hub.url in str(excinfo.value)


def test_a_private_repo_needs_the_right_token(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHub() as hub:
        hub.add_repo(TINY, tiny_dir, token="hf_good")
        # Like the real Hub: without a token, a private repo looks like a missing one.
        with pytest.raises(ModelNotFound, match="needs a valid token"):
            fetch(hub, TINY, tmp_path / "a")
        monkeypatch.setenv("HF_TOKEN", "hf_bad")
        with pytest.raises(SourceError, match="check the token"):
            fetch(hub, TINY, tmp_path / "b")
        monkeypatch.setenv("HF_TOKEN", "hf_good")
        fetch(hub, TINY, tmp_path / "c")
    assert "model.safetensors" in _tree(tmp_path / "c")


def test_a_hub_failing_midway_names_the_file(tiny_dir: Path, tmp_path: Path) -> None:
    with FakeHub() as hub:
        hub.add_repo(TINY, tiny_dir)
        hub.fail(r"/resolve/[^/]+/config\.json$", 500)
        with pytest.raises(SourceError, match=r"config\.json answered HTTP 500"):
            fetch(hub, TINY, tmp_path / "dest")
