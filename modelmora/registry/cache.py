"""The download cache: what model sources were fetched, kept by content under
`$MODELMORA_HOME/cache/downloads/`, and reused.

- `blobs/<sha256>`: each downloaded file (an archive, a single model file), named by its SHA-256;
  a source whose content is known (a lock file pins an archive's SHA-256) needs no download.
- `index.json`: URL -> the blob it last served, with the validators (ETag, Last-Modified) that
  let the next fetch ask "changed since?" and reuse the blob when it did not.
- `partial/<key>.part` (+ `.json`): a download cut short, resumed from where it stopped.
- `stamps.json`: the size and modification time of each blob as stored, so a blob changed in place
  since (through a model folder's hard link to it, `place`) is dropped instead of reused.

A model's files are hard links to the blobs when both are on one file system (`place`), so they
are stored once; removing either name (an uninstall, a prune) leaves the other intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ("CacheEntry", "DownloadCache", "place")


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One blob of the cache and the URLs that served it."""

    sha256: str
    size_bytes: int
    urls: tuple[str, ...]
    fetched_at: float
    """Unix time it was downloaded (or last reused)."""


@dataclass(frozen=True, slots=True)
class _Fetched:
    sha256: str
    etag: str = ""
    last_modified: str = ""
    fetched_at: float = 0.0


class DownloadCache:
    """The cache folder. Not shared by concurrent installs of one URL (they would both download)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.partial = root / "partial"

    @classmethod
    def under(cls, home: Path) -> DownloadCache:
        return cls(home / "cache" / "downloads")

    # -- blobs ------------------------------------------------------------------------------

    def blob(self, sha256: str) -> Path | None:
        """The cached file with this SHA-256, if any. A blob written to since it was stored (in
        place, through a model folder's hard link) no longer has that content: it is dropped."""
        path = self.blobs / sha256
        try:
            st = path.stat()
        except OSError:
            return None
        stamp = self._stamps().get(sha256)
        if stamp is not None and stamp != [st.st_size, st.st_mtime_ns]:
            path.unlink(missing_ok=True)  # the model folder keeps its (changed) file
            return None
        return path if path.is_file() else None

    def add(self, part: Path, sha256: str, url: str, *, etag: str = "", last_modified: str = "") -> Path:
        """Move a finished download into the cache under its SHA-256, and record what served it.
        A blob already there is kept (the model files linked to it stay linked)."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        path = self.blobs / sha256
        if self.blob(sha256) is not None:
            part.unlink(missing_ok=True)
        else:
            os.replace(part, path)
            st = path.stat()
            stamps = self._stamps()
            stamps[sha256] = [st.st_size, st.st_mtime_ns]
            self._write_json(self._stamps_path(), stamps)
        self._record(url, _Fetched(sha256, etag, last_modified, time.time()))
        return path

    def touch(self, url: str, sha256: str) -> None:
        """`url` served the cached blob `sha256` again (a 304, or its content was known)."""
        known = self._index().get(url)
        etag, modified = (known.etag, known.last_modified) if known and known.sha256 == sha256 else ("", "")
        self._record(url, _Fetched(sha256, etag, modified, time.time()))

    # -- what URLs served -------------------------------------------------------------------

    def validators(self, url: str) -> tuple[str, str, str] | None:
        """(sha256, ETag, Last-Modified) of what `url` served last, when that blob is still here."""
        known = self._index().get(url)
        if known is None or self.blob(known.sha256) is None:
            return None
        return known.sha256, known.etag, known.last_modified

    def _index_path(self) -> Path:
        return self.root / "index.json"

    def _index(self) -> dict[str, _Fetched]:
        try:
            raw = json.loads(self._index_path().read_text())
        except (OSError, ValueError):
            return {}
        out = {}
        for url, entry in raw.items() if isinstance(raw, dict) else ():
            try:
                out[url] = _Fetched(**entry)
            except TypeError:
                continue
        return out

    def _write_index(self, index: dict[str, _Fetched]) -> None:
        self._write_json(self._index_path(), {url: asdict(e) for url, e in sorted(index.items())})

    def _write_json(self, path: Path, data: object) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def _stamps_path(self) -> Path:
        return self.root / "stamps.json"

    def _stamps(self) -> dict[str, list[int]]:
        """SHA-256 -> [size, mtime in ns] of each blob as stored."""
        try:
            raw = json.loads(self._stamps_path().read_text())
        except (OSError, ValueError):
            return {}
        return raw if isinstance(raw, dict) else {}

    def _record(self, url: str, fetched: _Fetched) -> None:
        index = self._index()
        index[url] = fetched
        self._write_index(index)

    # -- partial downloads ------------------------------------------------------------------

    def partial_paths(self, url: str) -> tuple[Path, Path]:
        """(the bytes so far, their validator JSON) of an unfinished download of `url`."""
        self.partial.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256(url.encode()).hexdigest()[:32]
        return self.partial / f"{key}.part", self.partial / f"{key}.json"

    # -- listing and pruning ----------------------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """Every blob, newest first, with the URLs that served it."""
        index = self._index()
        out = []
        for path in self.blobs.iterdir() if self.blobs.is_dir() else ():
            urls = tuple(sorted(u for u, e in index.items() if e.sha256 == path.name))
            when = max((e.fetched_at for e in index.values() if e.sha256 == path.name), default=0.0)
            out.append(CacheEntry(path.name, path.stat().st_size, urls, when or path.stat().st_mtime))
        return sorted(out, key=lambda e: -e.fetched_at)

    def partial_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.partial.glob("*.part")) if self.partial.is_dir() else 0

    def prune(self, keep: set[str], *, older_than_s: float = 0.0) -> tuple[int, int]:
        """Remove the blobs not in `keep` (and fetched more than `older_than_s` ago) and every
        partial download; returns (files removed, bytes freed)."""
        removed = freed = 0
        now = time.time()
        for entry in self.entries():
            if entry.sha256 in keep or now - entry.fetched_at < older_than_s:
                continue
            (self.blobs / entry.sha256).unlink(missing_ok=True)
            removed, freed = removed + 1, freed + entry.size_bytes
        index = {u: e for u, e in self._index().items() if self.blob(e.sha256) is not None}
        if self.root.is_dir():
            self._write_index(index)
            stamps = {sha: stamp for sha, stamp in self._stamps().items() if (self.blobs / sha).is_file()}
            self._write_json(self._stamps_path(), stamps)
        if self.partial.is_dir():
            freed += self.partial_bytes()
            removed += len(list(self.partial.glob("*.part")))
            shutil.rmtree(self.partial, ignore_errors=True)
        return removed, freed


def place(blob: Path, target: Path) -> None:
    """Put a cached blob's content at `target`: a hard link when both are on one file system (one
    copy on disk; removing either name leaves the other), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    try:
        os.link(blob, target)
    except OSError:  # another file system, or one without hard links
        shutil.copyfile(blob, target)
