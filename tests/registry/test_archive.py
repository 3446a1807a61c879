"""Safe unpacking, member by member: links that stay inside are kept, everything that would reach
outside is refused; semantic-version order; the schema writer."""

from __future__ import annotations

import io
import json
import random
import tarfile
import zipfile
from pathlib import Path

import pytest

from modelmora.errors import InvalidInput
from modelmora.registry import latest, semver_key, split_ref
from modelmora.registry.archive import ArchiveLimits, is_archive, unpack
from modelmora.registry.schemas import json_schemas, write_schemas


def tar_with(path: Path, entries: list[tarfile.TarInfo], data: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info in entries:
            body = data.get(info.name)
            if body is not None:
                info.size = len(body)
            tar.addfile(info, io.BytesIO(body) if body is not None else None)
    return path


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


def test_links_inside_are_kept(tmp_path: Path) -> None:
    archive = tar_with(
        tmp_path / "a.tar",
        [
            entry("m/", tarfile.DIRTYPE),
            entry("m/sub/w.bin"),
            entry("m/sub/alias.bin", tarfile.SYMTYPE, "w.bin"),
            entry("m/top.bin", tarfile.SYMTYPE, "sub/w.bin"),
            entry("m/copy.bin", tarfile.LNKTYPE, "m/sub/w.bin"),
        ],
        {"m/sub/w.bin": b"weights"},
    )
    out = tmp_path / "out"
    out.mkdir()
    unpack(archive, out, ArchiveLimits(), what="a")
    assert (out / "sub" / "alias.bin").is_symlink() and (out / "sub" / "alias.bin").read_bytes() == b"weights"
    assert (out / "top.bin").read_bytes() == b"weights" and (out / "copy.bin").read_bytes() == b"weights"
    assert not (out / "copy.bin").is_symlink()  # a hard link becomes a copy of a file of the archive


@pytest.mark.parametrize(
    ("entries", "needle"),
    [
        ([entry("m/dev", tarfile.CHRTYPE)], "is a device or a pipe"),
        ([entry("m/fifo", tarfile.FIFOTYPE)], "is a device or a pipe"),
        ([entry("m/h", tarfile.LNKTYPE, "/etc/passwd")], "the link 'm/h' points outside"),
        ([entry("m/h", tarfile.LNKTYPE, "../x")], "the link 'm/h' points outside"),
        ([entry("m/h", tarfile.LNKTYPE, "m/none")], "names no file of the archive"),
        ([entry("c:/x")], "points outside"),
    ],
)
def test_what_reaches_outside_is_refused(tmp_path: Path, entries: list[tarfile.TarInfo], needle: str) -> None:
    archive = tar_with(tmp_path / "a.tar", entries, {})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidInput) as info:
        unpack(archive, out, ArchiveLimits(), what="the archive")
    assert needle in info.value.message


def test_not_an_archive_and_zip_folders(tmp_path: Path) -> None:
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"not an archive")
    assert not is_archive(plain)
    with pytest.raises(InvalidInput, match="not a tar or zip archive"):
        unpack(plain, tmp_path, ArchiveLimits(), what="x")
    z = tmp_path / "z.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a/", b"")
        zf.writestr("a/b/c.json", b"{}")
        zf.writestr("a/d.json", b"{}")
    out = tmp_path / "out"
    out.mkdir()
    unpack(z, out, ArchiveLimits(), what="z")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["b", "b/c.json", "d.json"]


def test_semantic_version_order() -> None:
    order = ["0.9.0", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta.2", "1.0.0-beta.11",
             "1.0.0-rc.1", "1.0.0", "1.2.0", "1.10.0", "2.0.0+build"]  # fmt: skip
    assert sorted(random.Random(0).sample(order, len(order)), key=semver_key) == order
    assert semver_key("not-semver") < semver_key("0.0.1")
    assert latest(order) == "2.0.0+build" and latest([]) is None
    assert split_ref("m@1.2.3") == ("m", "1.2.3") and split_ref("m") == ("m", None)
    with pytest.raises(InvalidInput):
        split_ref("m@v1")


def test_write_schemas(tmp_path: Path) -> None:
    written = write_schemas(tmp_path)
    assert {p.name for p in written} == set(json_schemas())
    for path in written:
        assert json.loads(path.read_text())["$schema"].startswith("https://json-schema.org/")
