"""HTTP(S) sources: an archive (tar.gz, zip) or a single file, unpacked safely, downloaded once into
the content-keyed cache and reused, an interrupted download resumed; `mm cache list|prune`.
A local HTTP server plays the remote side and records every request."""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import zipfile
from pathlib import Path

import pytest
from httpfiles import Files, files, model_files, targz
from test_cli import home, run_cli, st_dir

from modelmora.registry import SQLiteStore

__all__ = ("files", "home", "st_dir")

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


def test_an_archive_installs_once_and_is_reused_from_the_cache(
    home: Path, st_dir: Path, files: Files, capsys: Cap, monkeypatch: MP
) -> None:
    archive = targz(model_files(st_dir), top="tiny-model/")
    files.files["/models/tiny-model.tar.gz"] = archive
    url = files.url("/models/tiny-model.tar.gz")
    out = cli(capsys, monkeypatch, "install", url)
    assert "installed tiny-model 1.0.0 (txt2embed, 4 files" in out
    store = SQLiteStore(home / "registry.sqlite3")
    rec = store.get("tiny-model")
    assert rec is not None and rec.source == url and rec.metadata.source_url == url
    v = rec.versions[0]
    assert v.revision == hashlib.sha256(archive).hexdigest()  # the archive's content is the revision
    assert v.files["1_Pooling/config.json"] == hashlib.sha256(b"{}").hexdigest()  # the top folder dropped
    assert (home / "cache" / "downloads" / "blobs" / v.revision).read_bytes() == archive

    cli(capsys, monkeypatch, "install", url, "--version", "1.1.0")  # unchanged on the server: 304, no body
    assert files.gets("/models/tiny-model.tar.gz")[-1]["if-none-match"]
    assert store.get("tiny-model").versions[1].files == v.files  # type: ignore[union-attr]

    out = cli(capsys, monkeypatch, "cache", "list")
    assert v.revision in out and url in out
    data = json.loads(cli(capsys, monkeypatch, "cache", "list", "--json"))
    assert data[0]["sha256"] == v.revision and data[0]["urls"] == [url]
    assert "removed 0 files" in cli(capsys, monkeypatch, "cache", "prune")  # installed versions keep theirs
    assert "removed 1 files" in cli(capsys, monkeypatch, "cache", "prune", "--all")
    assert "is empty" in cli(capsys, monkeypatch, "cache", "list")
    store.close()


def test_zip_and_single_file_sources(home: Path, st_dir: Path, files: Files, capsys: Cap, monkeypatch: MP) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in model_files(st_dir).items():
            zf.writestr(name, data)
    files.files["/z/model.zip"] = buf.getvalue()
    assert "installed model 1.0.0 (txt2embed, 4 files" in cli(capsys, monkeypatch, "install", files.url("/z/model.zip"))
    files.files["/w/weights.bin"] = b"\1" * 32
    out = cli(capsys, monkeypatch, "install", files.url("/w/weights.bin"), "--task", "txt2embed", "--no-check")
    assert "installed weights 1.0.0 (txt2embed, 1 files" in out
    assert (home / "models" / "weights" / "1.0.0" / "weights.bin").read_bytes() == b"\1" * 32


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("dotdot", "the member '../evil.txt' points outside"),
        ("absolute", "the member '/tmp/evil.txt' points outside"),
        ("symlink", "the link 'model/passwd' points outside the folder ('/etc/passwd')"),
        ("uplink", "the link 'model/up' points outside the folder ('../../..')"),
        ("zipdotdot", "the member '../../evil.txt' points outside"),
        ("zipsymlink", "the member 'link' is a symbolic link"),
        ("bomb", "unpacks to more than 4096 bytes (max_unpacked_bytes)"),
        ("members", "more than 10 members (max_archive_members)"),
        ("big", "more than 100000 (max_download_bytes)"),
    ],
)
def test_a_malicious_archive_is_refused(
    home: Path, st_dir: Path, files: Files, tmp_path: Path, capsys: Cap, monkeypatch: MP, kind: str, needle: str
) -> None:
    good = model_files(st_dir)
    name = "/m.tar.gz"
    if kind == "dotdot":
        body = targz({**good, "../evil.txt": b"x"})
    elif kind == "absolute":
        body = targz({**good, "/tmp/evil.txt": b"x"})
    elif kind == "symlink":
        body = targz(good, links={"model/passwd": "/etc/passwd"})
    elif kind == "uplink":
        body = targz(good, links={"model/up": "../../.."})
    elif kind in ("zipdotdot", "zipsymlink"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for n, data in good.items():
                zf.writestr(n, data)
            if kind == "zipdotdot":
                zf.writestr("../../evil.txt", b"x")
            else:
                info = zipfile.ZipInfo("link")
                info.external_attr = (0o120777 << 16) | 0
                zf.writestr(info, "/etc/passwd")
        body, name = buf.getvalue(), "/m.zip"
    elif kind == "bomb":
        monkeypatch.setenv("MODELMORA_MAX_UNPACKED_BYTES", "4096")
        body = targz({**good, "zeros.bin": b"\0" * 100_000})  # compresses to ~100 bytes
    elif kind == "members":
        monkeypatch.setenv("MODELMORA_MAX_ARCHIVE_MEMBERS", "10")
        body = targz({f"f{i}.json": b"{}" for i in range(20)})
    else:
        monkeypatch.setenv("MODELMORA_MAX_DOWNLOAD_BYTES", "100000")
        body = targz({**good, "random.bin": random.Random(0).randbytes(200_000)})  # does not compress
    files.files[name] = body
    line = cli_error(capsys, monkeypatch, "install", files.url(name), "--task", "txt2embed")
    assert needle in line
    assert not (tmp_path / "evil.txt").exists() and not (home / "evil.txt").exists()
    assert not list(home.rglob("evil.txt")) and not list(home.rglob("passwd"))
    assert SQLiteStore(home / "registry.sqlite3").list() == []
    assert not list((home / "models").iterdir())  # no staging folder left


def test_an_interrupted_download_is_resumed(
    home: Path, st_dir: Path, files: Files, capsys: Cap, monkeypatch: MP
) -> None:
    """A connection dropped midway: the download goes on from where it stopped, at once."""
    archive = targz({**model_files(st_dir), "pad.bin": random.Random(1).randbytes(300_000)})
    files.files["/big.tar.gz"] = archive
    files.cut["/big.tar.gz"] = len(archive) // 2
    assert "installed big 1.0.0" in cli(capsys, monkeypatch, "install", files.url("/big.tar.gz"))
    first, resumed = files.gets("/big.tar.gz")
    assert "range" not in first
    assert resumed["range"] == f"bytes={len(archive) // 2}-" and resumed["if-range"]
    rec = SQLiteStore(home / "registry.sqlite3").get("big")
    assert rec is not None and rec.versions[0].revision == hashlib.sha256(archive).hexdigest()


def test_a_download_cut_again_and_again_resumes_on_the_next_install(
    home: Path, st_dir: Path, files: Files, capsys: Cap, monkeypatch: MP
) -> None:
    archive = targz({**model_files(st_dir), "pad.bin": random.Random(1).randbytes(300_000)})
    files.files["/big.tar.gz"] = archive
    files.cut["/big.tar.gz"] = step = len(archive) // 8
    files.cut_always.add("/big.tar.gz")
    line = cli_error(capsys, monkeypatch, "install", files.url("/big.tar.gz"))
    assert f"after {3 * step} bytes (run the install again to resume)" in line  # three tries, each resumed
    assert "unfinished downloads" in cli(capsys, monkeypatch, "cache", "list")
    files.cut_always.clear()
    files.cut.clear()
    out = cli(capsys, monkeypatch, "install", files.url("/big.tar.gz"))
    assert "installed big 1.0.0" in out
    resumed = files.gets("/big.tar.gz")[-1]
    assert resumed["range"] == f"bytes={3 * step}-" and resumed["if-range"]
    rec = SQLiteStore(home / "registry.sqlite3").get("big")
    assert rec is not None and rec.versions[0].revision == hashlib.sha256(archive).hexdigest()


def test_http_errors_are_one_line(home: Path, files: Files, capsys: Cap, monkeypatch: MP) -> None:
    assert "does not exist (HTTP 404)" in cli_error(capsys, monkeypatch, "install", files.url("/nope.tar.gz"))
    port = files.server.server_address[1]
    files.server.shutdown()
    files.server.server_close()
    line = cli_error(capsys, monkeypatch, "install", f"http://127.0.0.1:{port}/gone.tar.gz")
    assert "downloading http://127.0.0.1" in line and "ConnectError" in line
    assert "must name a file" in cli_error(capsys, monkeypatch, "install", "https://example.com/")


def test_lock_round_trip_of_an_http_source(
    home: Path, st_dir: Path, files: Files, tmp_path: Path, capsys: Cap, monkeypatch: MP
) -> None:
    """Installed from the lock with the archive still cached: no request at all; cache wiped too:
    downloaded again; a server now serving other bytes is refused."""
    monkeypatch.chdir(tmp_path)
    files.files["/m.tar.gz"] = targz(model_files(st_dir))
    cli(capsys, monkeypatch, "install", files.url("/m.tar.gz"), "--id", "m")
    cli(capsys, monkeypatch, "lock")
    before = SQLiteStore(home / "registry.sqlite3").get("m")
    shutil.rmtree(home / "models")
    (home / "registry.sqlite3").unlink()
    sent = len(files.requests)
    assert "1 installed" in cli(capsys, monkeypatch, "install", "--frozen")
    assert len(files.requests) == sent  # the pinned content was in the cache
    after = SQLiteStore(home / "registry.sqlite3").get("m")
    assert after is not None and before is not None and after.versions[0].files == before.versions[0].files

    shutil.rmtree(home)
    assert "1 installed" in cli(capsys, monkeypatch, "install", "--frozen")  # downloaded again
    shutil.rmtree(home)
    files.files["/m.tar.gz"] = targz({**model_files(st_dir), "more.json": b"{}"})
    line = cli_error(capsys, monkeypatch, "install", "--frozen")
    assert "now serves content with SHA-256" in line and "not the pinned" in line
