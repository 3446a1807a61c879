"""Properties of the shared-memory ring, checked against a model, plus two real processes."""

from __future__ import annotations

import itertools
import multiprocessing
import random
import socket
import time
import zlib
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from modelmora.ipc import segments
from modelmora.ipc.control import FrameDecoder, encode_frame, recv_message, send_message
from modelmora.ipc.messages import Error, ErrorCode, Infer, Message, Result, Shutdown, Span, Tensor, Text
from modelmora.ipc.pool import AttachedSegments, SegmentPool
from modelmora.ipc.ring import ALIGN, ExceedsRing, RingFull, ShmRing

capacities = st.integers(min_value=1, max_value=48).map(lambda k: k * ALIGN)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _pair(capacity: int) -> tuple[ShmRing, ShmRing]:
    """A producer and a consumer over one buffer, the way two processes see a segment."""
    buf = memoryview(bytearray(ShmRing.region_size(capacity)))
    return ShmRing(buf, capacity, init=True), ShmRing(buf, capacity)


# -- the model ---------------------------------------------------------------------------------


@dataclass
class _Held:
    """One outstanding span in the model: its bytes and the data-area intervals it holds."""

    span: Span
    payload: bytes
    intervals: list[tuple[int, int]] = field(default_factory=list)


class RingModel:
    """What the ring should do, in data-area offsets rather than absolute positions.

    Placement policy: a span goes at the head's offset when it fits before the end of the
    data area, else at offset 0, holding the skipped bytes until it is released. It fits
    when none of the intervals it would hold overlaps an interval still held, except on an
    empty ring, where anything up to the capacity fits.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.head = 0
        self.held: deque[_Held] = deque()

    def place(self, nbytes: int) -> tuple[int, list[tuple[int, int]]] | None:
        if nbytes == 0:
            return self.head, []
        size = _align(nbytes)
        if self.head + nbytes <= self.capacity:
            offset, want = self.head, [(self.head, self.head + size)]
        else:
            offset, want = 0, [(self.head, self.capacity), (0, size)]
            if not self.held:
                return offset, want
        for lo, hi in want:
            for held in self.held:
                if any(lo < h_hi and h_lo < hi for h_lo, h_hi in held.intervals):
                    return None
        return offset, want

    def commit(self, offset: int, intervals: list[tuple[int, int]], span: Span, payload: bytes) -> None:
        self.head = (offset + _align(len(payload))) % self.capacity
        self.held.append(_Held(span, payload, intervals))

    def release_through(self, index: int) -> None:
        for _ in range(index + 1):
            self.held.popleft()

    def held_bytes(self) -> int:
        return sum(hi - lo for h in self.held for lo, hi in h.intervals)


def _payload(counter: int, nbytes: int) -> bytes:
    return random.Random(counter).randbytes(nbytes)


class RingMachine(RuleBasedStateMachine):
    """Random writes, reads and releases; the ring must agree with `RingModel` throughout."""

    def __init__(self) -> None:
        super().__init__()
        self.counter = 0
        self.released: list[Span] = []

    @initialize(capacity=capacities)
    def setup(self, capacity: int) -> None:
        self.capacity = capacity
        self.producer, self.consumer = _pair(capacity)
        self.model = RingModel(capacity)

    def _sizes(self) -> st.SearchStrategy[int]:
        return st.integers(0, self.capacity + 2 * ALIGN)

    @rule(data=st.data(), mode=st.sampled_from(["reserve", "write", "write_chunks"]))
    def write(self, data: st.DataObject, mode: str) -> None:
        nbytes = data.draw(
            st.one_of(
                st.integers(0, self.capacity + 2 * ALIGN),
                st.sampled_from([0, 1, ALIGN, self.capacity - 1, self.capacity, self.capacity + 1]),
            ),
            label="nbytes",
        )
        self.counter += 1
        payload = _payload(self.counter, nbytes)
        if nbytes > self.capacity:
            assert not self.producer.fits(nbytes)
            with pytest.raises(ExceedsRing):
                self.producer.write_nowait(payload)
            return
        placed = self.model.place(nbytes)
        assert self.producer.fits(nbytes) == (placed is not None)
        if placed is None:
            with pytest.raises(RingFull):
                self.producer.reserve_nowait(nbytes)
            return
        if mode == "reserve":
            span, view = self.producer.reserve_nowait(nbytes)
            assert len(view) == nbytes and not view.readonly
            view[:] = payload
        elif mode == "write":
            span = self.producer.write_nowait(payload)
        else:
            cuts = sorted(data.draw(st.lists(st.integers(0, nbytes), max_size=4), label="cuts"))
            bounds = [0, *cuts, nbytes]
            chunks = [payload[a:b] for a, b in itertools.pairwise(bounds)]
            span = self.producer.write_nowait(*[bytearray(c) if i % 2 else memoryview(c) for i, c in enumerate(chunks)])
        offset, intervals = placed
        assert span.seg == ""
        assert span.nbytes == nbytes
        assert span.start % ALIGN == 0
        assert span.start % self.capacity == offset
        self.model.commit(offset, intervals, span, payload)

    @precondition(lambda self: bool(self.model.held))
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        held = data.draw(st.sampled_from(list(self.model.held)), label="span")
        assert self.consumer.read(held.span) == held.payload
        with self.consumer.view(held.span) as view:
            assert view == held.payload

    @precondition(lambda self: bool(self.model.held))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        # Mostly the oldest span; sometimes a later one, which releases those before it too.
        index = data.draw(st.integers(0, len(self.model.held) - 1) | st.just(0), label="index")
        span = self.model.held[index].span
        self.consumer.release(span)
        self.model.release_through(index)
        self.released.append(span)

    @precondition(lambda self: bool(self.released))
    @rule(data=st.data())
    def release_again(self, data: st.DataObject) -> None:
        """Releasing a span already given back changes nothing."""
        before = self.consumer.statistics()
        self.consumer.release(data.draw(st.sampled_from(self.released), label="old span"))
        assert self.consumer.statistics() == before

    @invariant()
    def statistics_agree(self) -> None:
        if not hasattr(self, "model"):
            return
        stats = self.producer.statistics()
        assert stats == self.consumer.statistics()
        assert stats.capacity == self.capacity
        assert stats.used_bytes == stats.head - stats.tail == self.model.held_bytes()
        assert stats.head % ALIGN == 0 and stats.tail % ALIGN == 0
        assert self.producer.free_bytes() == max(0, self.capacity - stats.used_bytes)
        if not self.model.held:
            assert stats.used_bytes == 0
            assert self.producer.fits(self.capacity)

    @invariant()
    def outstanding_bytes_intact(self) -> None:
        if not hasattr(self, "model"):
            return
        for held in self.model.held:
            assert self.consumer.read(held.span) == held.payload

    def teardown(self) -> None:
        if hasattr(self, "producer"):
            self.producer.close()
            self.consumer.close()


TestRingModel = RingMachine.TestCase
TestRingModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# -- single properties -------------------------------------------------------------------------


@given(capacity=capacities, extra=st.integers(1, 10_000))
def test_payload_larger_than_the_ring(capacity: int, extra: int) -> None:
    producer, _ = _pair(capacity)
    nbytes = capacity + extra
    assert not producer.fits(nbytes)
    with pytest.raises(ExceedsRing):
        producer.reserve_nowait(nbytes)
    with pytest.raises(ExceedsRing):
        producer.write_nowait(b"x" * nbytes)
    assert producer.statistics().used_bytes == 0


@given(capacity=capacities, sizes=st.lists(st.integers(0, 48 * ALIGN), max_size=20), last=st.data())
def test_an_empty_ring_takes_any_payload_up_to_its_capacity(
    capacity: int, sizes: list[int], last: st.DataObject
) -> None:
    """Whatever the head's offset, a drained ring never refuses (no wait without end)."""
    producer, consumer = _pair(capacity)
    for n in sizes:
        if n <= capacity:
            consumer.release(producer.write_nowait(bytes(n)))
    n = last.draw(st.integers(0, capacity))
    assert producer.fits(n)
    span = producer.write_nowait(_payload(n, n))
    assert consumer.read(span) == _payload(n, n)
    consumer.release(span)
    assert producer.statistics().used_bytes == 0


def test_wrap_on_an_empty_ring_regression() -> None:
    # Head at offset 576 of 1024: a 600-byte span fits neither before the end (448 left)
    # nor, by the padding rule alone, after it (576 free at the start): the old code
    # raised RingFull forever here although the ring was empty.
    producer, consumer = _pair(1024)
    consumer.release(producer.write_nowait(bytes(576)))
    span = producer.write_nowait(b"y" * 600)
    assert span.start == 1024
    # Until it is released, the skipped 448 bytes count as used and nothing else fits...
    assert producer.statistics().used_bytes == 448 + 640
    assert producer.free_bytes() == 0
    assert not producer.fits(1)
    assert producer.fits(0)
    consumer.release(span)
    assert producer.fits(1024)


def test_spans_skip_to_the_start_and_release_the_skipped_bytes() -> None:
    producer, consumer = _pair(256)
    a = producer.write_nowait(b"a" * 100)  # [0, 128)
    b = producer.write_nowait(b"b" * 64)  # [128, 192)
    consumer.release(a)
    c = producer.write_nowait(b"c" * 100)  # does not fit in [192, 256): skips to 0
    assert (c.start, c.start % 256) == (256, 0)
    assert producer.statistics().used_bytes == 64 + 64 + 128
    consumer.release(b)
    consumer.release(c)
    stats = producer.statistics()
    assert stats.used_bytes == 0 and stats.tail == stats.head == 384


def test_full_ring_and_zero_length_payloads() -> None:
    producer, consumer = _pair(128)
    a = producer.write_nowait(b"1" * 64)
    b = producer.write_nowait(b"2" * 64)
    assert producer.free_bytes() == 0
    with pytest.raises(RingFull):
        producer.write_nowait(b"3")
    empty = producer.write_nowait()
    assert empty.nbytes == 0 and empty.start % ALIGN == 0
    assert consumer.read(empty) == b""
    assert producer.statistics().used_bytes == 128
    consumer.release(a)
    consumer.release(b)
    consumer.release(empty)
    assert producer.statistics().used_bytes == 0


def test_bogus_spans_are_refused() -> None:
    producer, consumer = _pair(256)
    producer.write_nowait(b"x" * 10)
    with pytest.raises(ValueError, match="does not fit"):
        consumer.view(Span("", 192, 128))  # would cross the end of the data area
    with pytest.raises(ValueError, match="does not fit"):
        consumer.view(Span("", 8, 4))  # misaligned
    with pytest.raises(ValueError, match="never reserved"):
        consumer.release(Span("", 64, 10))  # beyond the head
    with pytest.raises(ValueError, match="negative"):
        producer.reserve_nowait(-1)
    with pytest.raises(ValueError, match="multiple"):
        ShmRing(memoryview(bytearray(1024)), 100)
    with pytest.raises(ValueError, match="smaller"):
        ShmRing(memoryview(bytearray(100)), 64)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(capacity=capacities, sizes=st.lists(st.integers(0, 48 * ALIGN), min_size=1, max_size=30))
def test_every_span_is_aligned(capacity: int, sizes: list[int]) -> None:
    producer, consumer = _pair(capacity)
    for n in (n for n in sizes if n <= capacity):
        if not producer.fits(n):
            consumer.release(Span("", producer.statistics().head, 0))  # drain all
        span, view = producer.reserve_nowait(n)
        assert span.start % ALIGN == 0
        # The view's address inside the region is aligned too (header is 128 bytes).
        assert (ShmRing.region_size(0) + span.start % capacity) % ALIGN == 0
        view.release()


# -- two processes -------------------------------------------------------------------------------

_N_PAYLOADS = 6000
_RING_BYTES = 4096
_SEED = 20260823


def _consumer(name: str, capacity: int, sock: socket.socket) -> None:
    """The worker side: attach by name, verify each payload's CRC, release it."""
    shm = segments.attach(name)
    ring = ShmRing(shm.buf, capacity)
    large = AttachedSegments()
    decoder: FrameDecoder = FrameDecoder()
    backlog: list[Message] = []
    verified = 0
    try:
        while True:
            msg = recv_message(sock, decoder, backlog)
            if msg is None or isinstance(msg, Shutdown):
                break
            assert isinstance(msg, Infer)
            (item,) = msg.inputs.values()
            span = item.span
            if isinstance(item, Text) and sum(item.lengths) != span.nbytes:
                send_message(sock, _error(msg.batch_id, "lengths"))
            if span.seg:
                with large.get(span.seg)[span.start : span.start + span.nbytes] as view:
                    crc = zlib.crc32(view)
                send_message(sock, Result(msg.batch_id, {}, 0.0))  # the producer may reuse it
            else:
                with ring.view(span) as view:
                    crc = zlib.crc32(view)
                ring.release(span)
            if crc != msg.params["crc"]:
                send_message(sock, _error(msg.batch_id, "crc"))
            else:
                verified += 1
        send_message(sock, Result(-1, {}, float(verified)))
    finally:
        ring.close()
        large.close()
        shm.close()
        sock.close()


def _error(batch_id: int, what: str) -> Message:
    return Error(batch_id, ErrorCode.INFERENCE_FAILED, what)


def test_producer_and_consumer_in_two_processes(instance_id: str) -> None:
    """Thousands of random payloads through a 4 KiB ring (it wraps hundreds of times)."""
    ctx = multiprocessing.get_context("spawn")
    shm = segments.create(instance_id, "ring", ShmRing.region_size(_RING_BYTES))
    ring = ShmRing(shm.buf, _RING_BYTES, init=True)
    pool = SegmentPool(instance_id, "large")
    ours, theirs = socket.socketpair()
    child = ctx.Process(target=_consumer, args=(shm.name, _RING_BYTES, theirs), daemon=True)
    child.start()
    theirs.close()
    rng = random.Random(_SEED)
    decoder = FrameDecoder()
    backlog: list[Message] = []
    errors: list[Message] = []
    deadline = time.monotonic() + 60
    waits = 0
    try:
        for i in range(_N_PAYLOADS):
            nbytes = rng.choice([0, rng.randrange(1, 64), rng.randrange(64, 3000), _RING_BYTES])
            if i % 500 == 7:
                nbytes = rng.randrange(_RING_BYTES + 1, 3 * _RING_BYTES)  # via the pool
            payload = rng.randbytes(nbytes)
            if nbytes > _RING_BYTES:
                name, view = pool.acquire(nbytes)
                view[:] = payload
                span = Span(name, 0, nbytes)
            else:
                while not ring.fits(nbytes):
                    waits += 1
                    assert time.monotonic() < deadline and child.is_alive(), "consumer stalled"
                    time.sleep(0.00005)
                span = ring.write_nowait(payload)
            if i % 2:
                item: Tensor | Text = Tensor(span, "|u1", (nbytes,))
            else:
                item = Text(span, [nbytes // 2, nbytes - nbytes // 2])
            send_message(ours, Infer(i, {"x": item}, {"crc": zlib.crc32(payload)}))
            if span.seg:  # wait until the consumer is done with the large segment
                while (msg := recv_message(ours, decoder, backlog)) is not None and not (
                    isinstance(msg, Result) and msg.batch_id == i
                ):
                    errors.append(msg)
                pool.release(span.seg)
        send_message(ours, Shutdown())
        while (msg := recv_message(ours, decoder, backlog)) is not None:
            if isinstance(msg, Result) and msg.batch_id == -1:
                assert msg.infer_ms == _N_PAYLOADS
                break
            errors.append(msg)
        else:
            pytest.fail("the consumer closed without its summary")
        assert errors == []
        assert waits > 0, "the ring never filled: the test does not exercise backpressure"
        assert ring.statistics().head > 100 * _RING_BYTES  # wrapped many times
        child.join(10)
        assert child.exitcode == 0
    finally:
        ours.close()
        child.join(10)
        if child.is_alive():
            child.kill()
        ring.close()
        pool.close()
        segments.unlink(shm)


def test_encode_frame_of_a_span_message_round_trips() -> None:
    msg = Infer(3, {"x": Tensor(Span("", 128, 4), "<f4", (1,))})
    assert FrameDecoder().feed(encode_frame(msg)) == [msg]
