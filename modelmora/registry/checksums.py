"""SHA-256 of a model's files: computed at install, checked before every load and activation.

`FileVerifier` checks a version's files against the digests the registry recorded. A file is
hashed once per change: the verifier remembers each file's digest under its identity (device,
inode, size, modification and status-change times), and any write to a file changes its
status-change time, which no user can set back. So a reload of an unchanged model costs a `stat`
per file, and a file changed by one byte is hashed again and caught before the next load. The
server keeps what it verified in `$MODELMORA_HOME/cache/verified.json`, so a restart does not hash
every model again (whoever can rewrite that file can rewrite the registry's checksums too).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from ..errors import ChecksumMismatch

__all__ = ("FileVerifier", "hash_files", "sha256_file")

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_files(root: Path, names: list[str]) -> dict[str, str]:
    """Relative path -> SHA-256 of each of `names` under `root`."""
    return {name: sha256_file(root / name) for name in names}


class FileVerifier:
    """Checks model files against their recorded SHA-256, hashing each file again only when it
    changed. Thread-safe (checks run in worker threads).

    Args:
        store: a JSON file keeping what was verified across restarts (None: in memory only).
    """

    def __init__(self, store: Path | None = None) -> None:
        self._known: dict[str, tuple[tuple[int, ...], str]] = {}
        self._lock = threading.Lock()
        self.store = store
        self.hashed_bytes = 0
        """Bytes read to hash files (a check of unchanged files reads none)."""
        if store is not None:
            try:
                raw = json.loads(store.read_text())
                self._known = {k: (tuple(int(x) for x in v[:5]), str(v[5])) for k, v in raw.items()}
            except (OSError, ValueError, TypeError, IndexError, AttributeError):
                self._known = {}  # missing or unreadable: verify again

    @classmethod
    def under(cls, home: Path) -> FileVerifier:
        """The verifier whose record lives in `home` (the server's and the CLI's)."""
        return cls(home / "cache" / "verified.json")

    def _save(self) -> None:
        if self.store is None:
            return
        with self._lock:
            data = {k: [*ident, digest] for k, (ident, digest) in self._known.items()}
        try:
            self.store.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.store.with_name(f".{self.store.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.store)
        except OSError:
            pass  # a cache: the next start verifies again

    def digest(self, path: Path) -> str:
        st = os.stat(path)
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        key = str(path)
        with self._lock:
            known = self._known.get(key)
        if known is not None and known[0] == ident:
            return known[1]
        digest = sha256_file(path)
        with self._lock:
            self._known[key] = (ident, digest)
            self.hashed_bytes += st.st_size
        return digest

    def verify(self, root: str | Path, files: dict[str, str], *, what: str) -> None:
        """Check every recorded file under `root` (files the registry does not list are not looked at).

        Args:
            what: names the model version in the error ("model 'x' version 1.0.0").

        Raises:
            ChecksumMismatch: a file is missing, unreadable, or its SHA-256 differs; the message
                names the file.
        """
        base = Path(root)
        before = self.hashed_bytes
        try:
            self._verify(base, files, what)
        finally:
            if self.hashed_bytes != before:
                self._save()

    def _verify(self, base: Path, files: dict[str, str], what: str) -> None:
        for name, expected in sorted(files.items()):
            path = base / name
            try:
                found = self.digest(path)
            except FileNotFoundError:
                raise ChecksumMismatch(
                    f"{what}: the file {name} is missing from {base} (reinstall it with mm install --force)",
                    file=name,
                ) from None
            except OSError as exc:
                raise ChecksumMismatch(
                    f"{what}: the file {name} cannot be read ({exc.strerror or exc})", file=name
                ) from None
            if found != expected:
                raise ChecksumMismatch(
                    f"{what}: checksum mismatch in {name}: SHA-256 {found[:12]}... differs from the"
                    f" {expected[:12]}... recorded at install (the file changed; restore it or reinstall"
                    " with mm install --force)",
                    file=name,
                )
