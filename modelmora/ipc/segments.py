"""Shared-memory segments: naming, creation, attachment, pooling and clean-up.

The supervisor owns every segment: it creates it, and unlinks it when the worker using it
ends, however it ends. Names carry the owning server's instance id,
``mm-<pid>-<random>-<label>-<random>``, so that a server starting up can remove the segments
of a server that died (SIGKILL leaves no chance to clean up) without touching a live one's.

Payloads larger than a ring travel in a large segment. Creating one per request is slow (a
fresh 64 MiB segment costs a page fault per 4 KiB page on both sides: it ran at 0.12x memcpy),
so the supervisor keeps a `SegmentPool` of reusable power-of-two segments per worker, and the
worker keeps each one attached in an `AttachedSegments` cache: both sides fault the pages in
once, on first use.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from types import TracebackType

__all__ = (
    "MIN_POOL_SEGMENT_BYTES",
    "PREFIX",
    "SHM_DIR",
    "AttachedSegments",
    "PoolStatistics",
    "SegmentPool",
    "attach",
    "close",
    "create",
    "new_instance_id",
    "our_segments",
    "pool_size_class",
    "remove_stale",
    "unlink",
)

PREFIX = "mm-"
SHM_DIR = Path("/dev/shm")
MIN_POOL_SEGMENT_BYTES = 1 << 20
_NAME = re.compile(r"^mm-(?P<pid>\d+)-[0-9a-f]+-")
_attach_lock = threading.Lock()


def new_instance_id() -> str:
    """An id for one server process: its pid plus randomness (pids get reused)."""
    return f"{os.getpid()}-{secrets.token_hex(3)}"


def create(instance_id: str, label: str, size: int) -> shared_memory.SharedMemory:
    """Create a new segment of `size` bytes named after the instance and `label`."""
    name = f"{PREFIX}{instance_id}-{label}-{secrets.token_hex(3)}"
    return shared_memory.SharedMemory(name=name, create=True, size=size)


def attach(name: str) -> shared_memory.SharedMemory:
    """Attach an existing segment without letting any resource tracker take it over.

    On Python < 3.13 attaching registers the segment with the attaching process's resource
    tracker, which would unlink it when that process exits, while the owner still uses it.
    Registering and then unregistering is not enough: a worker started through
    `multiprocessing` shares the supervisor's tracker, and its unregister would drop the
    supervisor's own registration (the tracker then loses the crash clean-up of that segment
    and prints a KeyError traceback when the supervisor unlinks it). So on those versions the
    registration is skipped while the segment is opened.
    """
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, create=False, track=False)  # type: ignore[call-arg,unused-ignore]
    with _attach_lock:
        register = resource_tracker.register
        resource_tracker.register = _skip_shared_memory(register)  # type: ignore[assignment]
        try:
            return shared_memory.SharedMemory(name=name, create=False)
        finally:
            resource_tracker.register = register


def _skip_shared_memory(register: Callable[[str, str], None]) -> Callable[[str, str], None]:
    def maybe_register(name: str, rtype: str) -> None:
        if rtype != "shared_memory":
            register(name, rtype)

    return maybe_register


def unlink(shm: shared_memory.SharedMemory) -> None:
    """Close and unlink a segment we created; never raises (it may be gone already).

    When views of the segment are still alive its mapping stays until they are gone, but
    the name is removed at once.
    """
    close(shm)
    with contextlib.suppress(FileNotFoundError):
        shm.unlink()


def close(shm: shared_memory.SharedMemory) -> bool:
    """Close a segment's mapping in this process; never raises.

    `SharedMemory.close` raises BufferError while views of the buffer are exported (a
    memoryview slice, a numpy array or torch tensor over it). Then the mapping is left to
    those views (it is unmapped when the last one dies) and the segment object is detached
    from it, so that neither a later `close` nor garbage collection raises.

    Returns:
        Whether the mapping was unmapped now.
    """
    try:
        shm.close()
    except BufferError:
        shm._buf = None  # type: ignore[attr-defined]
        shm._mmap = None  # type: ignore[attr-defined]
        fd: int = shm._fd  # type: ignore[attr-defined]
        if fd >= 0:
            os.close(fd)
            shm._fd = -1  # type: ignore[attr-defined]
        return False
    return True


def our_segments(instance_id: str | None = None) -> list[str]:
    """Names of ModelMora segments in /dev/shm (of one instance when given)."""
    if not SHM_DIR.is_dir():
        return []
    prefix = f"{PREFIX}{instance_id}-" if instance_id else PREFIX
    return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Unlink segments whose owning server process is gone; returns their names."""
    removed = []
    for name in our_segments():
        m = _NAME.match(name)
        if m is None or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            (SHM_DIR / name).unlink()
            removed.append(name)
    return removed


def _buffer(shm: shared_memory.SharedMemory) -> memoryview:
    buf = shm.buf
    if buf is None:
        raise ValueError(f"segment {shm.name} is closed")
    return buf


def _release_views(views: list[memoryview]) -> None:
    for v in views:
        with contextlib.suppress(BufferError):  # exported further (e.g. to numpy): dies with it
            v.release()
    views.clear()


# -- the supervisor's pool of large segments --------------------------------------------------


def pool_size_class(nbytes: int) -> int:
    """The segment size a pool uses for `nbytes`: a power of two, at least 1 MiB."""
    if nbytes < 0:
        raise ValueError(f"negative size {nbytes}")
    return max(MIN_POOL_SEGMENT_BYTES, 1 << max(0, nbytes - 1).bit_length())


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of a `SegmentPool`."""

    segments: int
    in_use: int
    total_bytes: int
    in_use_bytes: int
    created: int
    reused: int


class _Pooled:
    __slots__ = ("in_use", "shm", "size", "views")

    def __init__(self, shm: shared_memory.SharedMemory, size: int) -> None:
        self.shm = shm
        self.size = size
        self.in_use = False
        self.views: list[memoryview] = []


class SegmentPool:
    """Reusable large segments for payloads that do not fit a ring (supervisor side, sync).

    A segment is acquired for one payload, named in its `Span` (``seg``), and released when
    the peer is done with it; it then serves the next payload of the same size class. Sizes
    are rounded up to a power of two (at least 1 MiB), so a segment of a class serves any
    payload of that class. Segments are only unlinked by `close`, which the supervisor calls
    when the worker ends, however it ends.

    Not thread-safe: use it from one thread (the supervisor's event loop).

    Args:
        instance_id: the server's instance id (`new_instance_id`), part of every name.
        label: what the segments serve (e.g. the worker's name); part of every name.
    """

    def __init__(self, instance_id: str, label: str) -> None:
        self.instance_id = instance_id
        self.label = label
        self._segments: dict[str, _Pooled] = {}
        self._free: dict[int, list[str]] = {}
        self._created = 0
        self._reused = 0
        self._closed = False

    def acquire(self, nbytes: int) -> tuple[str, memoryview]:
        """Take a segment for a payload of `nbytes` bytes.

        Returns:
            The segment's name and a writable view of exactly `nbytes` bytes at its start,
            valid until `release(name)`.

        Raises:
            ValueError: `nbytes` is negative, or the pool is closed.
        """
        if self._closed:
            raise ValueError("segment pool is closed")
        size = pool_size_class(nbytes)
        free = self._free.get(size)
        if free:
            name = free.pop()
            entry = self._segments[name]
            self._reused += 1
        else:
            shm = create(self.instance_id, f"{self.label}-pool", size)
            name = shm.name
            entry = self._segments[name] = _Pooled(shm, size)
            self._created += 1
        entry.in_use = True
        view = self._view(entry, nbytes)
        return name, view

    def release(self, name: str) -> None:
        """Make segment `name` reusable; the views handed out for it are released.

        Releasing a segment that is already free does nothing.

        Raises:
            KeyError: `name` is not a segment of this pool.
        """
        entry = self._segments[name]
        _release_views(entry.views)
        if entry.in_use:
            entry.in_use = False
            self._free.setdefault(entry.size, []).append(name)

    def view(self, name: str, nbytes: int) -> memoryview:
        """A view of the first `nbytes` bytes of segment `name` (to read what the peer wrote).

        Valid until the segment is released.

        Raises:
            KeyError: `name` is not a segment of this pool.
            ValueError: `nbytes` is negative or larger than the segment.
        """
        entry = self._segments[name]
        return self._view(entry, nbytes)

    def _view(self, entry: _Pooled, nbytes: int) -> memoryview:
        if not 0 <= nbytes <= entry.size:
            raise ValueError(f"{nbytes} bytes do not fit a segment of {entry.size}")
        view = _buffer(entry.shm)[:nbytes]
        entry.views.append(view)
        return view

    def names(self) -> list[str]:
        """Names of every segment this pool owns (free or in use)."""
        return list(self._segments)

    def statistics(self) -> PoolStatistics:
        in_use = [e for e in self._segments.values() if e.in_use]
        return PoolStatistics(
            segments=len(self._segments),
            in_use=len(in_use),
            total_bytes=sum(e.size for e in self._segments.values()),
            in_use_bytes=sum(e.size for e in in_use),
            created=self._created,
            reused=self._reused,
        )

    def close(self) -> None:
        """Unlink every segment (idempotent). Views still exported keep their mapping alive."""
        self._closed = True
        for entry in self._segments.values():
            _release_views(entry.views)
            unlink(entry.shm)
        self._segments.clear()
        self._free.clear()

    def __enter__(self) -> SegmentPool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._closed and self._segments:
            warnings.warn(f"SegmentPool {self.label!r} was never closed", ResourceWarning, stacklevel=1)
            self.close()


# -- the worker's cache of attached segments -------------------------------------------------


class AttachedSegments:
    """The attaching side of large segments: attach each name once and keep it mapped.

    `get` returns the whole segment's buffer; slice it with the span's start and length.
    `close` closes every attachment (it never unlinks: the supervisor owns the names).
    """

    def __init__(self) -> None:
        self._attached: dict[str, shared_memory.SharedMemory] = {}

    def get(self, name: str) -> memoryview:
        """The buffer of segment `name`, attaching it on first use.

        Raises:
            FileNotFoundError: no segment has that name.
        """
        shm = self._attached.get(name)
        if shm is None:
            shm = self._attached[name] = attach(name)
        return _buffer(shm)

    def __contains__(self, name: object) -> bool:
        return name in self._attached

    def __len__(self) -> int:
        return len(self._attached)

    def discard(self, name: str) -> None:
        """Close the attachment of `name` if there is one (e.g. the owner unlinked it)."""
        shm = self._attached.pop(name, None)
        if shm is not None:
            close(shm)

    def close(self) -> None:
        """Close every attachment (idempotent).

        The buffers `get` returned are released. A segment still exported by a view or an
        array derived from one stays mapped until that view or array dies.
        """
        attached = list(self._attached.values())
        self._attached.clear()
        for shm in attached:
            close(shm)

    def __enter__(self) -> AttachedSegments:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
