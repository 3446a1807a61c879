"""Shared-memory segments: naming, creation, attachment, pooling and clean-up.

The supervisor owns every segment: it creates it, and unlinks it when the worker using it
ends, however it ends. Names carry the owning server's instance id,
``mm-<pid>-<random>-<label>-<random>``, so that a server starting up can remove the segments
of a server that died (SIGKILL leaves no chance to clean up) without touching a live one's.

Payloads larger than a ring travel in a large segment. Creating one per request is slow (a
fresh 64 MiB segment costs a page fault per 4 KiB page on both sides: it ran at 0.12x memcpy),
so the supervisor keeps a `SegmentPool` of reusable segments per worker, and the worker keeps
each one attached in an `AttachedSegments` cache. Beyond a small warm set (`POOL_KEEP_IDLE_SEGMENTS`,
`POOL_KEEP_IDLE_BYTES`) a released segment is unlinked, so /dev/shm comes back after a burst.

Every segment is backed by memory when it is created (`posix_fallocate`, or touching each page
where that is not supported). Sizing alone (`ftruncate`) succeeds on tmpfs whatever room is
left, and the first write into a page that cannot be allocated then kills the writer with
SIGBUS; a segment that cannot be backed raises `SharedMemoryExhausted` instead, and is unlinked.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import secrets
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from types import TracebackType

from .ring import ShmRing

__all__ = (
    "MIN_POOL_SEGMENT_BYTES",
    "POOL_KEEP_IDLE_BYTES",
    "POOL_KEEP_IDLE_SEGMENTS",
    "PREFIX",
    "SHM_DIR",
    "AttachedSegments",
    "PoolStatistics",
    "SegmentPool",
    "SharedMemoryExhausted",
    "ShmRoom",
    "attach",
    "close",
    "create",
    "ensure_ring_room",
    "ensure_room",
    "new_instance_id",
    "our_segments",
    "pool_size_class",
    "remove_stale",
    "shm_room",
    "unlink",
)

PREFIX = "mm-"
SHM_DIR = Path("/dev/shm")
MIN_POOL_SEGMENT_BYTES = 1 << 20
POOL_KEEP_IDLE_SEGMENTS = 2
"""Idle large segments a pool keeps for reuse; a release beyond this unlinks the oldest idle one."""
POOL_KEEP_IDLE_BYTES = 64 << 20
"""Bytes of idle large segments a pool keeps for reuse (a larger segment is unlinked when released)."""
_PAGE = mmap.PAGESIZE
_NAME = re.compile(r"^mm-(?P<pid>\d+)-[0-9a-f]+-")
_attach_lock = threading.Lock()


def new_instance_id() -> str:
    """An id for one server process: its pid plus randomness (pids get reused)."""
    return f"{os.getpid()}-{secrets.token_hex(3)}"


class SharedMemoryExhausted(OSError):
    """Raised by `create` (and `ensure_room`) when /dev/shm has no room for a segment.

    `needed` and `free` are in bytes (`free` is None where the room could not be measured).
    """

    def __init__(self, message: str, *, needed: int, free: int | None) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message
        self.needed = needed
        self.free = free

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class ShmRoom:
    """The size of the shared-memory file system and the bytes still free on it."""

    total: int
    free: int


def shm_room() -> ShmRoom | None:
    """How much room /dev/shm has (`os.statvfs`); None where there is no /dev/shm to measure."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return ShmRoom(total=st.f_blocks * st.f_frsize, free=st.f_bavail * st.f_frsize)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def ensure_room(nbytes: int, what: str = "a shared-memory segment", *, hint: str = "") -> None:
    """Raise `SharedMemoryExhausted` unless /dev/shm has `nbytes` free now (rounded up to pages).

    The message names /dev/shm, `what` needs the room, the bytes asked and the bytes free,
    then `hint` (what the operator can change). Does nothing where /dev/shm cannot be measured.
    """
    room = shm_room()
    needed = -(-nbytes // _PAGE) * _PAGE
    if room is None or needed <= room.free:
        return
    raise SharedMemoryExhausted(
        f"{SHM_DIR} has {_mib(room.free)} free of {_mib(room.total)} ({room.free} bytes);"
        f" {what} needs {_mib(needed)} ({needed} bytes){hint}",
        needed=needed,
        free=room.free,
    )


def ensure_ring_room(request_ring_mb: int, response_ring_mb: int) -> None:
    """Raise `SharedMemoryExhausted` unless /dev/shm can hold one worker's rings now.

    Called at server start with the `request_ring_mb` and `response_ring_mb` settings: a
    server that could not start a single worker refuses to start, in one line.
    """
    nbytes = ShmRing.region_size(max(0, request_ring_mb) << 20) + ShmRing.region_size(max(0, response_ring_mb) << 20)
    ensure_room(
        nbytes,
        f"one worker's rings (request_ring_mb = {request_ring_mb}, response_ring_mb = {response_ring_mb})",
        hint=f": lower these settings or give {SHM_DIR} more room (e.g. docker run --shm-size)",
    )


def create(instance_id: str, label: str, size: int) -> shared_memory.SharedMemory:
    """Create a new segment of `size` bytes named after the instance and `label`, fully backed.

    /dev/shm's free room is checked first, then every page is allocated once
    (`posix_fallocate`; touching each page where that is not supported), so that no later
    write into the segment can fail with SIGBUS.

    Raises:
        SharedMemoryExhausted: /dev/shm has no room for `size` bytes (nothing is left behind).
    """
    what = f"a segment for {label!r}"
    ensure_room(size, what)
    name = f"{PREFIX}{instance_id}-{label}-{secrets.token_hex(3)}"
    shm = shared_memory.SharedMemory(name=name, create=True, size=size)
    try:
        _allocate(shm, size)
    except OSError as exc:
        unlink(shm)
        if exc.errno not in (errno.ENOSPC, errno.ENOMEM):
            raise
        room = shm_room()
        free = room.free if room is not None else None
        raise SharedMemoryExhausted(
            f"{SHM_DIR} has no room for {what}: {_mib(size)} ({size} bytes) asked,"
            f" {'an unknown amount' if free is None else f'{_mib(free)} ({free} bytes)'} free",
            needed=size,
            free=free,
        ) from exc
    except BaseException:
        unlink(shm)
        raise
    return shm


def _allocate(shm: shared_memory.SharedMemory, size: int) -> None:
    """Back every page of a new segment with memory, once."""
    fd: int = shm._fd  # type: ignore[attr-defined]
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None:
        try:
            fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        else:
            return
    _touch_pages(_buffer(shm), size)


def _touch_pages(buf: memoryview, size: int) -> None:
    """Write a zero into each page (the fallback where the file system has no fallocate)."""
    pages = -(-size // _PAGE)
    buf[: pages * _PAGE : _PAGE] = bytes(pages)


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
    """The segment size a pool uses for `nbytes`: at least 1 MiB, at most 25% above `nbytes`.

    Sizes above 1 MiB are rounded up to a quarter of their power of two (5, 6, 7 or 8 MiB
    between 4 and 8 MiB): segments are fully backed, so coarser classes would waste /dev/shm.
    """
    if nbytes < 0:
        raise ValueError(f"negative size {nbytes}")
    if nbytes <= MIN_POOL_SEGMENT_BYTES:
        return MIN_POOL_SEGMENT_BYTES
    step = 1 << ((nbytes - 1).bit_length() - 3)
    return -(-nbytes // step) * step


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of a `SegmentPool`."""

    segments: int
    in_use: int
    total_bytes: int
    in_use_bytes: int
    created: int
    reused: int
    trimmed: int = 0
    """Segments unlinked on release because the warm set was full."""


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
    the peer is done with it; it then serves a later payload that fits it (of its size
    class, up to half its size). Sizes are rounded up by `pool_size_class`. A released
    segment joins a warm set of at most `keep_idle_segments` segments and `keep_idle_bytes`
    bytes; the oldest idle segments beyond that are unlinked (the worker's attachment stays
    mapped until it drops it; the name is gone at once). `close`, which the supervisor calls
    when the worker ends however it ends, unlinks the rest.

    Not thread-safe: use it from one thread (the supervisor's event loop).

    Args:
        instance_id: the server's instance id (`new_instance_id`), part of every name.
        label: what the segments serve (e.g. the worker's name); part of every name.
        keep_idle_segments: most idle segments kept for reuse.
        keep_idle_bytes: most bytes of idle segments kept for reuse.
    """

    def __init__(
        self,
        instance_id: str,
        label: str,
        *,
        keep_idle_segments: int = POOL_KEEP_IDLE_SEGMENTS,
        keep_idle_bytes: int = POOL_KEEP_IDLE_BYTES,
    ) -> None:
        self.instance_id = instance_id
        self.label = label
        self.keep_idle_segments = keep_idle_segments
        self.keep_idle_bytes = keep_idle_bytes
        self._segments: dict[str, _Pooled] = {}
        self._idle: OrderedDict[str, _Pooled] = OrderedDict()  # oldest release first
        self._created = 0
        self._reused = 0
        self._trimmed = 0
        self._closed = False

    def acquire(self, nbytes: int) -> tuple[str, memoryview]:
        """Take a segment for a payload of `nbytes` bytes.

        Reuses the smallest idle segment that fits (up to twice the size class), else creates
        one; when /dev/shm has no room for it, the idle segments are unlinked and it is tried once more.

        Returns:
            The segment's name and a writable view of exactly `nbytes` bytes at its start,
            valid until `release(name)`.

        Raises:
            SharedMemoryExhausted: /dev/shm has no room for the segment.
            ValueError: `nbytes` is negative, or the pool is closed.
        """
        if self._closed:
            raise ValueError("segment pool is closed")
        size = pool_size_class(nbytes)
        fitting = [e for e in self._idle.values() if size <= e.size <= 2 * size]
        if fitting:
            entry = min(fitting, key=lambda e: e.size)
            del self._idle[entry.shm.name]
            self._reused += 1
        else:
            try:
                shm = create(self.instance_id, f"{self.label}-pool", size)
            except SharedMemoryExhausted:
                if not self._idle:
                    raise
                self._trim(0, 0)  # our idle segments hold room: give it back and try once more
                shm = create(self.instance_id, f"{self.label}-pool", size)
            entry = self._segments[shm.name] = _Pooled(shm, size)
            self._created += 1
        entry.in_use = True
        view = self._view(entry, nbytes)
        return entry.shm.name, view

    def release(self, name: str) -> None:
        """Make segment `name` reusable (or unlink it, beyond the warm set); its views are released.

        Releasing a segment that is already free (or unlinked by this pool) does nothing.

        Raises:
            KeyError: `name` is not a segment of this pool.
        """
        entry = self._segments.get(name)
        if entry is None:
            if name.startswith(f"{PREFIX}{self.instance_id}-{self.label}-pool-"):
                return  # trimmed already
            raise KeyError(name)
        _release_views(entry.views)
        if entry.in_use:
            entry.in_use = False
            self._idle[name] = entry
            if entry.size > self.keep_idle_bytes:  # too large to keep: it alone goes
                self._idle.move_to_end(name, last=False)
                self._trim(len(self._idle) - 1, self.keep_idle_bytes)
            self._trim(self.keep_idle_segments, self.keep_idle_bytes)

    def _trim(self, max_segments: int, max_bytes: int) -> None:
        """Unlink the oldest idle segments until at most `max_segments` / `max_bytes` stay."""
        idle_bytes = sum(e.size for e in self._idle.values())
        while self._idle and (len(self._idle) > max_segments or idle_bytes > max_bytes):
            name, entry = self._idle.popitem(last=False)
            idle_bytes -= entry.size
            del self._segments[name]
            unlink(entry.shm)
            self._trimmed += 1

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
            trimmed=self._trimmed,
        )

    def close(self) -> None:
        """Unlink every segment (idempotent). Views still exported keep their mapping alive."""
        self._closed = True
        for entry in self._segments.values():
            _release_views(entry.views)
            unlink(entry.shm)
        self._segments.clear()
        self._idle.clear()

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
