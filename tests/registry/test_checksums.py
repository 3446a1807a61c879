"""Checksums enforced: a model file whose SHA-256 differs from the one recorded at install refuses
the load and the activation with an error naming the file, the previous version keeps serving,
/health/models shows why; the file restored, it loads. On asyncio and trio."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelmora.errors import ChecksumMismatch
from modelmora.registry import FileVerifier, hash_files, install

from conftest import AppUnderTest


def flip_one_byte(path: Path) -> bytes:
    """Change one byte in place, keeping the size and the modification time; the old content."""
    old = path.read_bytes()
    st = path.stat()
    with path.open("r+b") as f:
        f.seek(len(old) // 2)
        f.write(bytes([old[len(old) // 2] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return old


def test_the_verifier_hashes_a_file_again_only_when_it_changed(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"a" * 1000)
    (tmp_path / "sub" / "b.json").write_text("{}")
    files = hash_files(tmp_path, ["a.bin", "sub/b.json"])
    verifier = FileVerifier()
    verifier.verify(tmp_path, files, what="m")
    assert verifier.hashed_bytes == 1002
    verifier.verify(tmp_path, files, what="m")
    assert verifier.hashed_bytes == 1002  # unchanged files: a stat each, no reading

    flip_one_byte(tmp_path / "a.bin")
    with pytest.raises(ChecksumMismatch) as info:
        verifier.verify(tmp_path, files, what="model 'm' version 1.0.0")
    assert info.value.file == "a.bin" and info.value.code == "checksum_mismatch"
    assert info.value.message.startswith("model 'm' version 1.0.0: checksum mismatch in a.bin")

    (tmp_path / "sub" / "b.json").unlink()
    (tmp_path / "a.bin").write_bytes(b"a" * 1000)
    with pytest.raises(ChecksumMismatch) as info:
        verifier.verify(tmp_path, files, what="m")
    assert info.value.file == "sub/b.json" and "is missing" in info.value.message
    (tmp_path / "extra").write_text("not recorded")  # files the registry does not list are not looked at
    (tmp_path / "sub" / "b.json").write_text("{}")
    verifier.verify(tmp_path, files, what="m")


def test_what_was_verified_survives_a_restart(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "w.bin").write_bytes(b"w" * 500)
    files = hash_files(model, ["w.bin"])
    FileVerifier.under(tmp_path / "home").verify(model, files, what="m")
    again = FileVerifier.under(tmp_path / "home")  # a new process: the record on disk
    again.verify(model, files, what="m")
    assert again.hashed_bytes == 0
    flip_one_byte(model / "w.bin")  # same size and mtime; the status-change time moves
    with pytest.raises(ChecksumMismatch):
        FileVerifier.under(tmp_path / "home").verify(model, files, what="m")
    (tmp_path / "home" / "cache" / "verified.json").write_text("{not json")
    broken = FileVerifier.under(tmp_path / "home")  # an unreadable record: everything is hashed again
    with pytest.raises(ChecksumMismatch):
        broken.verify(model, files, what="m")
    assert broken.hashed_bytes == 500


pytestmark = pytest.mark.anyio


@pytest.mark.settings(keep_alive="-1", load_retry_base_s=60.0)
async def test_a_tampered_version_is_refused_and_the_previous_one_serves(
    echo_app: AppUnderTest, echo_dir: Path
) -> None:
    client = echo_app.client
    install(echo_app.store, echo_app.home, str(echo_dir), model_id="echo", version="2.0.0")
    weights = echo_app.home / "models" / "echo" / "2.0.0" / "weights.bin"
    original = flip_one_byte(weights)

    r = await client.post("/api/v1/models/echo/versions/2.0.0")
    assert r.status_code == 409 and r.json()["error"]["code"] == "checksum_mismatch", r.text
    assert "checksum mismatch in weights.bin" in r.json()["error"]["message"]
    assert (await client.get("/api/v1/models/echo")).json()["active_version"] == "1.0.0"
    r = await client.post("/api/v1/infer/echo", json={"input_data": {"text": "hi"}})
    assert r.status_code == 200 and r.json()["version"] == "1.0.0"  # the previous version serves

    r = await client.post("/api/v1/infer/echo", json={"input_data": {"text": "hi"}, "version": "2.0.0"})
    assert r.status_code == 503 and "checksum mismatch in weights.bin" in r.json()["error"]["message"], r.text
    health = await client.get("/health/models")
    assert health.status_code == 503
    bad = [m for m in health.json()["models"] if not m["healthy"]]
    assert [(m["model_id"], m["version"]) for m in bad] == [("echo", "2.0.0")]
    assert "weights.bin" in bad[0]["reason"]

    weights.write_bytes(original)  # restored: it loads
    r = await client.post("/api/v1/models/echo/load", params={"version": "2.0.0"})
    assert r.status_code == 200 and r.json()["state"] == "ready", r.text
    assert (await client.post("/api/v1/models/echo/versions/2.0.0")).status_code == 200
    r = await client.post("/api/v1/infer/echo", json={"input_data": {"text": "hi"}})
    assert r.status_code == 200 and r.json()["version"] == "2.0.0"
    assert (await client.get("/health/models")).status_code == 200
