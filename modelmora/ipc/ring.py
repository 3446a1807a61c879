"""Single-producer, single-consumer byte ring over a shared-memory buffer.

The ring never carries framing of its own: the producer reserves a contiguous span,
writes the payload into it and tells the consumer where it is (a `Span` in a control
message on the socket). The consumer reads the bytes, or uses them in place, and then
releases the span. Spans are released in the order they were written.

Memory layout of one ring region::

    [0:8)     tail: absolute position released by the consumer (written by the consumer)
    [64:72)   head: absolute position reserved by the producer (written by the producer,
              informational: the producer keeps its own copy)
    [128:...) data, `capacity` bytes

Positions are absolute byte counts that only grow; the offset in the data area is
``position % capacity``. A span never wraps: when it does not fit before the end of the
data area the producer skips to the start, and the skipped bytes are released together
with the span. Every span starts on a 64-byte boundary so that numpy or torch views over
it are aligned for any dtype.

Any payload of at most `capacity` bytes fits once the consumer has released everything:
on an empty ring a span that does not fit before the end of the data area goes to its
start whatever the padding. Until that span is released the ring's used bytes (which
count the padding) may then exceed `capacity`, and nothing else fits. A zero-length span
takes no space and always fits.

Spans must be released in the order they were written: releasing a span also releases
every span written before it, even one the consumer still reads.

The 8-byte header words are written through a ``memoryview.cast("Q")`` (one aligned
8-byte store on x86-64 and arm64), so the other process never sees a torn value.
"""

from __future__ import annotations

from dataclasses import dataclass

from .messages import Span

__all__ = ("ALIGN", "HEADER_BYTES", "ExceedsRing", "RingFull", "RingStatistics", "ShmRing")

ALIGN = 64
HEADER_BYTES = 128
_TAIL = 0
_HEAD = 8  # index in 8-byte words: byte offset 64


class RingFull(Exception):
    """Raised by `ShmRing.reserve_nowait` when the payload fits the ring but not its free space now."""


class ExceedsRing(Exception):
    """Raised by `ShmRing.reserve_nowait` when a payload is larger than the whole ring."""


@dataclass(frozen=True, slots=True)
class RingStatistics:
    """A snapshot of a ring's occupancy."""

    capacity: int
    used_bytes: int
    head: int
    tail: int


def _align_up(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


class ShmRing:
    """One direction of byte transfer between two processes over a shared buffer.

    Args:
        buffer: the ring region (`region_size(capacity)` bytes) inside a shared segment.
        capacity: bytes of payload space; a multiple of 64.
        init: zero the header (the creating side does this once, before the peer attaches).
    """

    def __init__(self, buffer: memoryview, capacity: int, *, init: bool = False) -> None:
        if capacity <= 0 or capacity % ALIGN:
            raise ValueError(f"ring capacity must be a positive multiple of {ALIGN}, got {capacity}")
        if len(buffer) < self.region_size(capacity):
            raise ValueError("buffer is smaller than the ring region")
        self.capacity = capacity
        self._words = buffer[:HEADER_BYTES].cast("Q")
        self._data = buffer[HEADER_BYTES : HEADER_BYTES + capacity]
        if init:
            self._words[_TAIL] = 0
            self._words[_HEAD] = 0
        self._head = self._words[_HEAD]

    @staticmethod
    def region_size(capacity: int) -> int:
        """Bytes a ring of `capacity` occupies in a segment (header included)."""
        return HEADER_BYTES + capacity

    # -- producer side ---------------------------------------------------------------

    def free_bytes(self) -> int:
        """Bytes released by the consumer and not reserved again (ignores contiguity).

        Producer side only: the consumer's view of the head is not kept up to date.
        """
        return max(0, self.capacity - (self._head - self._words[_TAIL]))

    def fits(self, nbytes: int) -> bool:
        """Whether a span of `nbytes` could be reserved right now."""
        return self._placement(nbytes) is not None

    def _placement(self, nbytes: int) -> int | None:
        head = self._head
        if nbytes == 0:
            return head
        used = head - self._words[_TAIL]
        offset = head % self.capacity
        if offset + nbytes <= self.capacity:
            return head if nbytes <= self.capacity - used else None
        pad = self.capacity - offset
        if used == 0 and nbytes <= self.capacity:
            # Empty ring: the whole data area is free, so the span goes to its start even
            # when padding plus span exceed the capacity; without this a payload larger than
            # both `offset` and `capacity - offset` would never fit (the producer would wait
            # for space forever).
            return head + pad
        if pad + nbytes > self.capacity - used:
            return None
        return head + pad

    def reserve_nowait(self, nbytes: int) -> tuple[Span, memoryview]:
        """Reserve a contiguous span of `nbytes` and return it with a writable view.

        Raises:
            ExceedsRing: `nbytes` exceeds the ring's capacity.
            RingFull: not enough space has been released yet; retry after the consumer
                releases (the caller decides how to wait, e.g. polling `fits`).
            ValueError: `nbytes` is negative.
        """
        if nbytes < 0:
            raise ValueError(f"negative payload size {nbytes}")
        if nbytes > self.capacity:
            raise ExceedsRing(f"payload of {nbytes} bytes exceeds ring capacity {self.capacity}")
        start = self._placement(nbytes)
        if start is None:
            raise RingFull(nbytes)
        self._head = start + _align_up(nbytes)
        self._words[_HEAD] = self._head
        offset = start % self.capacity
        return Span("", start, nbytes), self._data[offset : offset + nbytes]

    def write_nowait(self, *chunks: bytes | bytearray | memoryview) -> Span:
        """Copy `chunks` back to back into one new span.

        Raises:
            ExceedsRing: the chunks together exceed the capacity.
            RingFull: see `reserve_nowait`.
        """
        total = sum(memoryview(c).nbytes for c in chunks)
        span, view = self.reserve_nowait(total)
        pos = 0
        for chunk in chunks:
            m = memoryview(chunk).cast("B")
            view[pos : pos + m.nbytes] = m
            pos += m.nbytes
        return span

    # -- consumer side ---------------------------------------------------------------

    def view(self, span: Span) -> memoryview:
        """A zero-copy view of `span`; valid until the span is released.

        Raises:
            ValueError: `span` cannot come from this ring (misaligned, or crossing the end
                of the data area): a bug on the producer's side.
        """
        offset = span.start % self.capacity
        if span.start < 0 or span.start % ALIGN or span.nbytes < 0 or offset + span.nbytes > self.capacity:
            raise ValueError(f"span {span} does not fit a ring of capacity {self.capacity}")
        return self._data[offset : offset + span.nbytes]

    def read(self, span: Span) -> bytes:
        """Copy the bytes of `span` out (does not release it)."""
        return bytes(self.view(span))

    def release(self, span: Span) -> None:
        """Give `span` (and everything written before it) back to the producer.

        Releasing a span again, or one older than a span already released, does nothing.

        Raises:
            ValueError: `span` ends beyond what the producer reserved (a bogus span would
                otherwise let the producer overwrite bytes still in use).
        """
        end = span.start + _align_up(span.nbytes)
        if end > self._words[_TAIL]:
            if end > self._words[_HEAD]:
                raise ValueError(f"span {span} was never reserved (head {self._words[_HEAD]})")
            self._words[_TAIL] = end

    def statistics(self) -> RingStatistics:
        """A snapshot from the shared header; `used_bytes` counts skipped padding too."""
        tail = self._words[_TAIL]
        head = self._words[_HEAD]
        return RingStatistics(self.capacity, head - tail, head, tail)

    def close(self) -> None:
        """Drop the views so the underlying segment can be closed."""
        self._words.release()
        self._data.release()
