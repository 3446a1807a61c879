"""The inference streams' rules, without a process: request-ring spans are released in arrival
order however batches finish, batches run on the caller's thread or on streams of their own, and a
batch gets all torch threads alone, its share beside another."""

from __future__ import annotations

import threading

from modelmora.ipc import messages as m
from modelmora_workers.streams import ReleaseInOrder, Streams, ThreadShare, stream_count


def batch(bid: int, *, seg: str = "") -> m.Infer:
    return m.Infer(bid, {"text": m.Text(m.Span(seg, bid * 100, 10), [10])})


def test_spans_are_released_in_arrival_order_whatever_the_finishing_order() -> None:
    released: list[int] = []
    order = ReleaseInOrder(lambda span: released.append(span.start // 100))
    first, second, third = batch(1), batch(2), batch(3)
    for msg in (first, second, third):
        order.accept(msg)
    order.done(second)  # finished first, but the first batch still reads its inputs
    assert released == []
    order.done(first)
    assert released == [1, 2]
    order.done(third)
    order.done(third)  # once only
    assert released == [1, 2, 3]


def test_large_segment_spans_are_not_ring_spans() -> None:
    released: list[int] = []
    order = ReleaseInOrder(lambda span: released.append(span.start // 100))
    large, small = batch(1, seg="big-1"), batch(2)
    order.accept(large)
    order.accept(small)
    order.done(small)
    order.done(large)
    assert released == [2]


def test_one_stream_runs_on_the_callers_thread_several_on_their_own() -> None:
    ran: list[tuple[int, str]] = []
    inline = Streams(1, lambda msg: ran.append((msg.batch_id, threading.current_thread().name)))
    inline.start()
    inline.submit(batch(1))
    inline.stop()
    assert ran == [(1, threading.current_thread().name)]
    ran.clear()
    both_running = threading.Barrier(2, timeout=30)

    def run(msg: m.Infer) -> None:
        both_running.wait()  # two batches at once, or this never passes
        ran.append((msg.batch_id, threading.current_thread().name))

    two = Streams(2, run)
    two.start()
    two.submit(batch(1))
    two.submit(batch(2))
    two.stop()  # returns once both ran
    assert sorted(bid for bid, _ in ran) == [1, 2]
    assert {name for _, name in ran} == {"stream-0", "stream-1"}


def test_a_batch_alone_gets_every_thread_beside_another_its_share() -> None:
    share = ThreadShare(8, 2)
    assert (share.threads, share.share) == (8, 4)
    assert (ThreadShare(1, 4).share, ThreadShare(0, 0).threads) == (1, 1)


def test_stream_count() -> None:
    assert stream_count(0, "cuda", 4) == 2
    assert stream_count(0, "cpu", 4) == 1
    assert stream_count(3, "cpu", 2) == 2  # a stream needs a thread on a CPU
    assert stream_count(3, "cuda:1", 1) == 3
