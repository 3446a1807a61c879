"""Hugging Face downloads through the download cache: a file cut midway resumes with `Range`
(at once, else on the next install) instead of starting over; LFS files are reused from the cache
by their SHA-256. Against `FakeHub` (real HTTP), its CDN behind a proxy that cuts connections."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from cutproxy import CutProxy
from huggingface_hub import constants

from modelmora.errors import ChecksumMismatch, ModelNotFound, SourceError
from modelmora.registry import DownloadCache, SourceLimits, parse_source
from modelmora.registry.sources import download_hf

from fakehub import FakeHub

REPO = "acme/tiny-st"
WEIGHTS = bytes(range(256)) * 1024  # 256 KiB, in LFS: fetched from the CDN


@pytest.fixture(autouse=True)
def _isolated_hf(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the developer's token and offline setting out of the way."""
    home = tmp_path_factory.mktemp("hf_home")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_ID_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    d = tmp_path / "repo"
    (d / "1_Pooling").mkdir(parents=True)
    (d / "modules.json").write_text("[]")
    (d / "config.json").write_text("{}")
    (d / "1_Pooling" / "config.json").write_text("{}")
    (d / "README.md").write_text("not needed by the loader\n")
    (d / "model.safetensors").write_bytes(WEIGHTS)
    return d


@pytest.fixture
def hub(repo_dir: Path) -> Iterator[tuple[FakeHub, CutProxy]]:
    """The hub, whose LFS redirects go through a cutting proxy in front of its CDN."""
    with FakeHub() as running:
        running.add_repo(REPO, repo_dir)
        port = int(running.cdn_url.rsplit(":", 1)[1])
        with CutProxy(("127.0.0.1", port)) as proxy:
            running._cdn_url = proxy.url  # the Location of LFS redirects
            yield running, proxy


def ranged_starts(proxy: CutProxy) -> list[int]:
    return [int(m[1]) for head in proxy.requests if (m := re.search(r"\r\nrange: bytes=(\d+)-", head))]


def fetch(hub: FakeHub, dest: Path, cache: DownloadCache) -> str:
    return download_hf(parse_source(REPO), dest, cache, SourceLimits(), endpoint=hub.url)


def test_only_the_needed_files_byte_exact_at_the_commit(hub: tuple[FakeHub, CutProxy], tmp_path: Path) -> None:
    fake, _ = hub
    seen: list[tuple[int, int]] = []
    commit = download_hf(
        parse_source(REPO),
        tmp_path / "dest",
        DownloadCache(tmp_path / "cache"),
        SourceLimits(),
        endpoint=fake.url,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert commit == fake.sha(REPO)
    got = sorted(p.relative_to(tmp_path / "dest").as_posix() for p in (tmp_path / "dest").rglob("*") if p.is_file())
    assert got == ["1_Pooling/config.json", "config.json", "model.safetensors", "modules.json"]  # no README
    assert (tmp_path / "dest" / "model.safetensors").read_bytes() == WEIGHTS
    assert seen[-1][0] == seen[-1][1] == len(WEIGHTS) + len("[]") + 2 * len("{}")


def test_a_file_cut_midway_resumes_at_once(hub: tuple[FakeHub, CutProxy], tmp_path: Path) -> None:
    fake, proxy = hub
    proxy.cut("/lfs/", 64 * 1024)

    fetch(fake, tmp_path / "dest", DownloadCache(tmp_path / "cache"))

    assert proxy.cuts_done == 1
    [start] = ranged_starts(proxy)  # one ranged GET, from what the cut connection brought
    assert 0 < start <= 64 * 1024
    assert (tmp_path / "dest" / "model.safetensors").read_bytes() == WEIGHTS


def test_an_install_cut_again_and_again_resumes_on_the_next_attempt(
    hub: tuple[FakeHub, CutProxy], tmp_path: Path
) -> None:
    fake, proxy = hub
    cache = DownloadCache(tmp_path / "cache")
    proxy.cut("/lfs/", 32 * 1024, times=100)
    with pytest.raises(SourceError, match=r"model\.safetensors failed after \d+ bytes \(run the install again"):
        fetch(fake, tmp_path / "first", cache)
    kept = cache.partial_bytes()
    assert 0 < kept < len(WEIGHTS)
    proxy.disarm()
    before = len(ranged_starts(proxy))

    fetch(fake, tmp_path / "second", cache)

    assert ranged_starts(proxy)[before:] == [kept]  # from where the last try stopped
    assert (tmp_path / "second" / "model.safetensors").read_bytes() == WEIGHTS
    assert cache.partial_bytes() == 0


def test_lfs_files_are_reused_from_the_cache_by_content(hub: tuple[FakeHub, CutProxy], tmp_path: Path) -> None:
    fake, proxy = hub
    cache = DownloadCache(tmp_path / "cache")
    fetch(fake, tmp_path / "one", cache)
    cdn_gets = sum(head.startswith("get /lfs/") for head in proxy.requests)
    fetch(fake, tmp_path / "two", cache)
    assert sum(head.startswith("get /lfs/") for head in proxy.requests) == cdn_gets == 1
    assert (tmp_path / "two" / "model.safetensors").read_bytes() == WEIGHTS
    assert cache.blob(hashlib.sha256(WEIGHTS).hexdigest()) is not None


def test_a_file_whose_content_differs_from_the_hubs_listing_is_refused(
    hub: tuple[FakeHub, CutProxy], repo_dir: Path, tmp_path: Path
) -> None:
    fake, _ = hub
    (repo_dir / "model.safetensors").write_bytes(b"tampered" + WEIGHTS[8:])  # served, not what was listed
    with pytest.raises(ChecksumMismatch, match=r"not the pinned"):
        fetch(fake, tmp_path / "dest", DownloadCache(tmp_path / "cache"))


def test_a_repo_that_does_not_exist(hub: tuple[FakeHub, CutProxy], tmp_path: Path) -> None:
    fake, _ = hub
    with pytest.raises(ModelNotFound, match="nobody/nothing"):
        download_hf(
            parse_source("nobody/nothing"),
            tmp_path / "d",
            DownloadCache(tmp_path / "c"),
            SourceLimits(),
            endpoint=fake.url,
        )
