"""S3 sources against a real S3 server (SeaweedFS, as the result store tests use): a prefix of
objects, one archive object, objects reused from the cache while their ETag is unchanged, a lock
round trip; errors are one line."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest
from aiobotocore.session import get_session  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from cutproxy import CutProxy
from test_cli import home, run_cli, st_dir

from modelmora.registry import DownloadCache, SQLiteStore

from s3server import SeaweedS3, seaweed

__all__ = ("home", "seaweed", "st_dir")

Cap = pytest.CaptureFixture[str]
MP = pytest.MonkeyPatch


def put_objects(server: SeaweedS3, bucket: str, objects: dict[str, bytes]) -> None:
    async def put() -> None:
        async with get_session().create_client(
            "s3",
            endpoint_url=server.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        ) as client:
            try:
                await client.create_bucket(Bucket=bucket)
            except Exception as exc:
                if "BucketAlready" not in type(exc).__name__ and "BucketAlready" not in str(exc):
                    raise
            for key, body in objects.items():
                await client.put_object(Bucket=bucket, Key=key, Body=body)

    anyio.run(put, backend="asyncio")


@pytest.fixture
def s3_env(seaweed: SeaweedS3, monkeypatch: MP) -> dict[str, Any]:
    monkeypatch.setenv("MODELMORA_S3__ENDPOINT_URL", seaweed.endpoint_url)
    monkeypatch.setenv("MODELMORA_S3__ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("MODELMORA_S3__SECRET_ACCESS_KEY", seaweed.secret_key)
    return {"bucket": f"mm-{uuid.uuid4().hex[:12]}"}


def files_of(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


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


def test_a_prefix_of_objects_and_an_archive_object(
    home: Path, st_dir: Path, seaweed: SeaweedS3, s3_env: dict[str, Any], capsys: Cap, monkeypatch: MP
) -> None:
    bucket = s3_env["bucket"]
    model = files_of(st_dir)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in model.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    put_objects(
        seaweed, bucket, {**{f"models/tiny/{k}": v for k, v in model.items()}, "a/packed.tar.gz": buf.getvalue()}
    )

    out = cli(capsys, monkeypatch, "install", f"s3://{bucket}/models/tiny")
    assert "installed tiny 1.0.0 (txt2embed, 4 files" in out
    store = SQLiteStore(home / "registry.sqlite3")
    rec = store.get("tiny")
    assert rec is not None and rec.source == f"s3://{bucket}/models/tiny"
    assert rec.versions[0].files == {k: hashlib.sha256(v).hexdigest() for k, v in model.items()}
    blobs = {p.name: p.stat().st_ino for p in (home / "cache" / "downloads" / "blobs").iterdir()}

    cli(capsys, monkeypatch, "install", f"s3://{bucket}/models/tiny/", "--version", "1.1.0")  # ETags unchanged
    assert {p.name: p.stat().st_ino for p in (home / "cache" / "downloads" / "blobs").iterdir()} == blobs
    assert store.get("tiny").versions[1].revision == rec.versions[0].revision  # type: ignore[union-attr]

    out = cli(capsys, monkeypatch, "install", f"s3://{bucket}/a/packed.tar.gz")
    assert "installed packed 1.0.0 (txt2embed, 4 files" in out
    packed = store.get("packed")
    assert packed is not None and packed.versions[0].revision == hashlib.sha256(buf.getvalue()).hexdigest()
    assert packed.versions[0].files == rec.versions[0].files
    entries = DownloadCache.under(home).entries()
    assert any(f"s3://{bucket}/a/packed.tar.gz" in e.urls for e in entries)
    store.close()


def test_lock_round_trip_of_an_s3_source(
    home: Path, st_dir: Path, seaweed: SeaweedS3, s3_env: dict[str, Any], tmp_path: Path, capsys: Cap, monkeypatch: MP
) -> None:
    bucket = s3_env["bucket"]
    put_objects(seaweed, bucket, {f"m/{k}": v for k, v in files_of(st_dir).items()})
    monkeypatch.chdir(tmp_path)
    cli(capsys, monkeypatch, "install", f"s3://{bucket}/m", "--id", "m")
    cli(capsys, monkeypatch, "lock")
    before = SQLiteStore(home / "registry.sqlite3").get("m")
    shutil.rmtree(home)
    assert "1 installed" in cli(capsys, monkeypatch, "install", "--frozen")
    after = SQLiteStore(home / "registry.sqlite3").get("m")
    assert before is not None and after is not None
    assert (
        after.versions[0].files == before.versions[0].files
        and after.versions[0].revision == before.versions[0].revision
    )

    put_objects(seaweed, bucket, {"m/config.json": b'{"changed": 1}'})
    shutil.rmtree(home)
    line = cli_error(capsys, monkeypatch, "install", "--frozen")
    assert "not the pinned" in line or "checksum mismatch in config.json" in line


def test_s3_errors_are_one_line(
    home: Path, seaweed: SeaweedS3, s3_env: dict[str, Any], capsys: Cap, monkeypatch: MP
) -> None:
    bucket = s3_env["bucket"]
    put_objects(seaweed, bucket, {"x/config.json": b"{}"})
    line = cli_error(capsys, monkeypatch, "install", f"s3://{bucket}/nothing/here", "--task", "txt2embed")
    assert "no object there, and none under it" in line
    line = cli_error(capsys, monkeypatch, "install", "s3://no-such-bucket-mm/x", "--task", "txt2embed")
    assert "s3://no-such-bucket-mm/x" in line
    monkeypatch.setenv("MODELMORA_S3__SECRET_ACCESS_KEY", "wrong")
    line = cli_error(capsys, monkeypatch, "install", f"s3://{bucket}/x", "--task", "txt2embed")
    assert "S3 refused access" in line


BIG = 3 * 2**20


def _ranges(proxy: CutProxy, key: str) -> list[int]:
    """The start of every ranged GET of `key` that went through the proxy."""
    starts = []
    for head in proxy.requests:
        if head.startswith("get ") and key in head.split("\r\n", 1)[0]:
            found = re.search(r"\r\nrange: bytes=(\d+)-", head)
            starts += [int(found[1])] if found else []
    return starts


@pytest.fixture
def cut_s3(seaweed: SeaweedS3, s3_env: dict[str, Any], monkeypatch: MP) -> Iterator[CutProxy]:
    """A proxy in front of the S3 server, which the installs use."""
    parts = urlsplit(seaweed.endpoint_url)
    with CutProxy((parts.hostname or "127.0.0.1", parts.port or 80)) as proxy:
        monkeypatch.setenv("MODELMORA_S3__ENDPOINT_URL", proxy.url)
        yield proxy


def test_a_download_cut_midway_resumes_where_it_stopped(
    home: Path, st_dir: Path, seaweed: SeaweedS3, s3_env: dict[str, Any], cut_s3: CutProxy, capsys: Cap, monkeypatch: MP
) -> None:
    bucket, big = s3_env["bucket"], os.urandom(BIG)
    put_objects(seaweed, bucket, {**{f"m/{k}": v for k, v in files_of(st_dir).items()}, "m/big.bin": big})
    cut_s3.cut("m/big.bin", 2**20)

    assert "installed m 1.0.0" in cli(capsys, monkeypatch, "install", f"s3://{bucket}/m", "--id", "m")

    assert cut_s3.cuts_done == 1
    [start] = _ranges(cut_s3, "m/big.bin")  # one ranged GET, from what the cut connection brought
    assert 0 < start <= 2**20
    rec = SQLiteStore(home / "registry.sqlite3").get("m")
    assert rec is not None and rec.versions[0].files["big.bin"] == hashlib.sha256(big).hexdigest()
    assert (Path(rec.versions[0].path) / "big.bin").read_bytes() == big


def test_an_install_that_failed_midway_resumes_on_the_next_attempt(
    home: Path, st_dir: Path, seaweed: SeaweedS3, s3_env: dict[str, Any], cut_s3: CutProxy, capsys: Cap, monkeypatch: MP
) -> None:
    bucket, big = s3_env["bucket"], os.urandom(BIG)
    put_objects(seaweed, bucket, {**{f"m/{k}": v for k, v in files_of(st_dir).items()}, "m/big.bin": big})
    cut_s3.cut("m/big.bin", 2**18, times=100)  # every try is cut: the install fails

    line = cli_error(capsys, monkeypatch, "install", f"s3://{bucket}/m", "--id", "m")
    assert f"s3://{bucket}/m/big.bin" in line and "run the install again to resume" in line
    part = DownloadCache.under(home).partial_bytes()
    assert 0 < part < BIG
    cut_s3.disarm()
    before = len(_ranges(cut_s3, "m/big.bin"))

    assert "installed m 1.0.0" in cli(capsys, monkeypatch, "install", f"s3://{bucket}/m", "--id", "m")
    assert _ranges(cut_s3, "m/big.bin")[before:] == [part]  # from where the last try stopped
    rec = SQLiteStore(home / "registry.sqlite3").get("m")
    assert rec is not None and (Path(rec.versions[0].path) / "big.bin").read_bytes() == big
    assert DownloadCache.under(home).partial_bytes() == 0


def test_a_changed_object_is_not_spliced_onto_a_partial_download(
    home: Path, st_dir: Path, seaweed: SeaweedS3, s3_env: dict[str, Any], cut_s3: CutProxy, capsys: Cap, monkeypatch: MP
) -> None:
    bucket, old, new = s3_env["bucket"], os.urandom(BIG), os.urandom(BIG)
    put_objects(seaweed, bucket, {**{f"m/{k}": v for k, v in files_of(st_dir).items()}, "m/big.bin": old})
    cut_s3.cut("m/big.bin", 2**18, times=100)
    cli_error(capsys, monkeypatch, "install", f"s3://{bucket}/m", "--id", "m")
    cut_s3.disarm()
    put_objects(seaweed, bucket, {"m/big.bin": new})  # another ETag: the partial bytes are stale

    cli(capsys, monkeypatch, "install", f"s3://{bucket}/m", "--id", "m")
    rec = SQLiteStore(home / "registry.sqlite3").get("m")
    assert rec is not None and (Path(rec.versions[0].path) / "big.bin").read_bytes() == new
