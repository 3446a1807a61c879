"""Inference streams: the threads that run whole batches, and the rules that let them overlap.

A worker runs its batches on the main thread, one after the other; or, for a pipeline that
declares `concurrent = True` when the supervisor asks for several streams (`Load.streams`),
on that many dedicated threads (`Streams`), each running whole batches: on all the torch
threads when it runs alone, on its share of them beside another (`ThreadShare`).

Batches may then finish out of order, while each ring is released in the order it was written
(a span's release also releases every span before it). So request-ring spans are released in
arrival order (`ReleaseInOrder`: a batch done before an earlier one waits for it); the
response ring's rule is the worker loop's (a result is written and announced under one lock).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from modelmora.ipc import messages as m

from .process import set_torch_threads

__all__ = ("ReleaseInOrder", "Streams", "ThreadShare", "stream_count")


def stream_count(asked: int, device: str, threads: int) -> int:
    """How many batches a concurrent pipeline runs at once: `asked`, or for 0 two on a GPU (one
    tokenizes while the other runs there) and one on a CPU. On a CPU each needs a thread."""
    count = asked if asked > 0 else (2 if device.startswith("cuda") else 1)
    return max(1, count if device.startswith("cuda") else min(count, threads))


class ThreadShare:
    """Torch threads per running batch: all `threads` when it runs alone (light load loses nothing
    to the streams), its share (`threads // streams`) when it starts beside others."""

    def __init__(self, threads: int, streams: int) -> None:
        self.threads = max(1, threads)
        self.share = max(1, threads // max(1, streams))
        self._lock = threading.Lock()
        self._active = 0
        """Batches in the pipeline now."""
        self._local = threading.local()
        """Per inference thread: the torch thread count it last set."""

    def begin(self) -> None:
        """Count a batch as running, and give this thread its torch threads (a per-thread count)."""
        with self._lock:
            self._active += 1
            count = self.threads if self._active == 1 else self.share
        if count != getattr(self._local, "threads", 0) and set_torch_threads(count):
            self._local.threads = count

    def end(self) -> None:
        with self._lock:
            self._active -= 1


class ReleaseInOrder:
    """Releases each batch's request-ring spans once it and every batch that arrived before it
    no longer read their inputs.

    Args:
        release: releases one span of the request ring.
    """

    def __init__(self, release: Callable[[m.Span], None]) -> None:
        self._release = release
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[m.Infer, bool]] = {}
        """Batches in arrival order (= the order of their request-ring spans), and whether done."""

    def accept(self, msg: m.Infer) -> None:
        """Note a batch as it arrives (before any later batch: arrival order is span order)."""
        with self._lock:
            self._pending[msg.batch_id] = (msg, False)

    def done(self, msg: m.Infer) -> None:
        """The batch no longer reads its inputs: release its request-ring spans, and those of every
        batch before it that is done too (a span's release also releases all spans before it)."""
        with self._lock:
            if msg.batch_id not in self._pending:
                return
            self._pending[msg.batch_id] = (msg, True)
            while self._pending:
                bid, (first, done) = next(iter(self._pending.items()))
                if not done:
                    return
                del self._pending[bid]
                for item in first.inputs.values():
                    if not item.span.seg:
                        self._release(item.span)


class Streams:
    """Runs batches with `run`: on the caller's thread when `count` is 1, else on `count` threads
    of their own, each taking the next batch when its last one is done.

    Args:
        count: how many batches run at once.
        run: runs one batch to its end (it reports its own result or error).
    """

    def __init__(self, count: int, run: Callable[[m.Infer], None]) -> None:
        self._run = run
        self._work: queue.SimpleQueue[m.Infer | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._stream, name=f"stream-{i}") for i in range(count if count > 1 else 0)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, msg: m.Infer) -> None:
        """Run the batch now (one stream) or hand it to the next free stream."""
        if self._threads:
            self._work.put(msg)
        else:
            self._run(msg)

    def stop(self) -> None:
        """Let the streams finish the batches handed to them, then end them."""
        for _ in self._threads:
            self._work.put(None)
        for thread in self._threads:
            thread.join()

    def _stream(self) -> None:
        """One inference stream: whole batches, one after the other."""
        while (msg := self._work.get()) is not None:
            self._run(msg)
