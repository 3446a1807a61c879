"""Unpacking a model archive (tar, tar.gz/bz2/xz, zip) safely: nothing lands outside the target
folder, no link points outside it, no device or pipe is created, and the members' count and total
size stay within limits (checked while writing, whatever the headers claim)."""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from ..errors import InvalidInput, PayloadTooLarge

__all__ = ("ArchiveLimits", "is_archive", "safe_member_path", "unpack")

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class ArchiveLimits:
    max_members: int = 100_000
    max_unpacked_bytes: int = 256 * 2**30


def is_archive(path: Path) -> bool:
    """A zip or tar file (by content, not by name)."""
    return zipfile.is_zipfile(path) or tarfile.is_tarfile(path)


def safe_member_path(name: str, what: str) -> PurePosixPath:
    """The member's path inside the target, refusing absolute paths, `..`, drive letters and NULs."""
    clean = name.replace("\\", "/")
    path = PurePosixPath(clean)
    if "\0" in name or path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise InvalidInput(f"{what}: the member {name!r} points outside the folder it unpacks into; refused")
    return PurePosixPath(*[p for p in path.parts if p not in ("", ".")])


def _copy(src: IO[bytes], dest: Path, budget: list[int], limits: ArchiveLimits, what: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("wb") as out:
        while chunk := src.read(_CHUNK):
            budget[0] += len(chunk)
            if budget[0] > limits.max_unpacked_bytes:
                raise PayloadTooLarge(
                    f"{what}: unpacks to more than {limits.max_unpacked_bytes} bytes (max_unpacked_bytes); refused"
                )
            out.write(chunk)


def _inside(target: Path, link: PurePosixPath, where: PurePosixPath) -> bool:
    """Whether a link at `where` pointing to `link` stays inside `target` (no filesystem access)."""
    if link.is_absolute():
        return False
    parts: list[str] = list(where.parent.parts)
    for part in link.parts:
        if part == "..":
            if not parts:
                return False
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return True


def _unpack_tar(archive: Path, target: Path, limits: ArchiveLimits, what: str) -> None:
    budget = [0]
    with tarfile.open(archive) as tar:
        links: list[tuple[PurePosixPath, PurePosixPath, bool]] = []
        for count, member in enumerate(tar, 1):
            if count > limits.max_members:
                raise PayloadTooLarge(f"{what}: more than {limits.max_members} members (max_archive_members); refused")
            rel = safe_member_path(member.name, what)
            if not rel.parts:
                continue
            if member.isdir():
                (target / rel).mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                src = tar.extractfile(member)
                assert src is not None
                with src:
                    _copy(src, target / rel, budget, limits, what)
            elif member.issym() or member.islnk():
                link = PurePosixPath(member.linkname.replace("\\", "/"))
                where = rel if member.issym() else PurePosixPath()
                if (member.issym() and not _inside(target, link, where)) or (
                    member.islnk() and (link.is_absolute() or ".." in link.parts)
                ):
                    raise InvalidInput(
                        f"{what}: the link {member.name!r} points outside the folder ({member.linkname!r}); refused"
                    )
                links.append((rel, link, member.issym()))
            else:
                raise InvalidInput(f"{what}: the member {member.name!r} is a device or a pipe; refused")
        for rel, link, symbolic in links:  # links last: no file is written through one
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if symbolic:
                dest.symlink_to(link)
            else:
                source = target / link
                if not source.is_file() or source.is_symlink():
                    raise InvalidInput(f"{what}: the hard link {str(rel)!r} names no file of the archive; refused")
                shutil.copyfile(source, dest)


def _unpack_zip(archive: Path, target: Path, limits: ArchiveLimits, what: str) -> None:
    budget = [0]
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise PayloadTooLarge(f"{what}: more than {limits.max_members} members (max_archive_members); refused")
        for info in infos:
            rel = safe_member_path(info.filename, what)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise InvalidInput(f"{what}: the member {info.filename!r} is a symbolic link; refused")
            if not rel.parts:
                continue
            if info.is_dir():
                (target / rel).mkdir(parents=True, exist_ok=True)
                continue
            with zf.open(info) as src:
                _copy(src, target / rel, budget, limits, what)


def unpack(archive: Path, target: Path, limits: ArchiveLimits, *, what: str) -> None:
    """Unpack `archive` into the empty folder `target`; when everything sits in one top folder,
    that folder's content becomes `target`'s.

    Raises:
        InvalidInput: a member would land outside `target`, a link points outside, a device or pipe,
            or the file is not a tar or zip archive (`what` names it in the message).
        PayloadTooLarge: more members or more bytes than `limits`.
    """
    if zipfile.is_zipfile(archive):
        _unpack_zip(archive, target, limits, what)
    elif tarfile.is_tarfile(archive):
        try:
            _unpack_tar(archive, target, limits, what)
        except (tarfile.TarError, EOFError) as exc:
            raise InvalidInput(f"{what}: not a readable archive ({exc})") from None
    else:
        raise InvalidInput(f"{what}: not a tar or zip archive")
    tops = list(target.iterdir())
    if len(tops) == 1 and tops[0].is_dir() and not tops[0].is_symlink():
        inner = tops[0]
        staging = target / f".unpacked-{inner.name}"
        inner.rename(staging)
        for child in staging.iterdir():
            child.rename(target / child.name)
        staging.rmdir()
