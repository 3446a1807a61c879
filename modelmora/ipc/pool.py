"""Large segments: the supervisor's pool of reusable segments and the worker's attachments.

Payloads larger than a ring travel in a large segment. Creating one per request is slow (a
fresh 64 MiB segment costs a page fault per 4 KiB page on both sides: it ran at 0.12x memcpy),
so the supervisor keeps a `SegmentPool` of reusable segments per worker, and the worker keeps
each one attached in an `AttachedSegments` cache. Beyond a small warm set (`POOL_KEEP_IDLE_SEGMENTS`,
`POOL_KEEP_IDLE_BYTES`) a released segment is unlinked, so /dev/shm comes back after a burst.
The segments themselves are made, attached and unlinked by `segments`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing import shared_memory
from types import TracebackType

from .segments import PREFIX, SharedMemoryExhausted, _buffer, attach, close, create, unlink

__all__ = (
    "MIN_POOL_SEGMENT_BYTES",
    "POOL_KEEP_IDLE_BYTES",
    "POOL_KEEP_IDLE_SEGMENTS",
    "AttachedSegments",
    "PoolStatistics",
    "SegmentPool",
    "pool_size_class",
)

MIN_POOL_SEGMENT_BYTES = 1 << 20
POOL_KEEP_IDLE_SEGMENTS = 2
"""Idle large segments a pool keeps for reuse; a release beyond this unlinks the oldest idle one."""
POOL_KEEP_IDLE_BYTES = 64 << 20
"""Bytes of idle large segments a pool keeps for reuse (a larger segment is unlinked when released)."""


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
