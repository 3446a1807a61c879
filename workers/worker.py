"""The worker loop: control message -> read ring -> pipeline -> write ring -> Result.

One worker process serves one model version. Inference runs on this process's main thread
(torch thread count set explicitly), or for a concurrent pipeline on several inference streams
(`streams`: the threads, and why request-ring spans are released in arrival order). Each result
is written and announced under one lock, so that the response ring keeps its write-order release
rule. The worker exits when told to (`Shutdown`), when the supervisor closes the control channel
(`channel`: the reader thread, cancel flags, heartbeats), or when its parent dies
(PR_SET_PDEATHSIG on Linux, see `process`): the supervisor for a spawned worker
(`python -m modelmora_workers`), the zygote for a forked one (`modelmora_workers.zygote`),
which itself dies with the supervisor.

Start-up, as reported in `Loaded`: `import_ms` (the preloaded libraries and the pipeline's
module; near zero in a worker forked from the zygote, which imported them already),
`load_ms` (constructing the pipeline: reading the weights) and `warmup_ms` (the test inference).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any

from modelmora.ipc import messages as m
from modelmora.ipc.pool import AttachedSegments
from modelmora.ipc.ring import ExceedsRing, RingFull, ShmRing
from modelmora.ipc.segments import attach

from . import cancel, events, logline, payloads
from .channel import Channel
from .pipelines.base import InputError, Pipeline
from .process import (
    die_with_parent,
    hold_tokenizer_threads,
    parse_args,
    pipeline_class,
    preload,
    release_gpu_memory,
    release_tokenizer_threads,
    set_torch_threads,
    vram_bytes,
)
from .streams import ReleaseInOrder, Streams, ThreadShare, stream_count

__all__ = ("Worker", "main", "serve", "stream_count")

_RING_WAIT_MAX_S = 0.005


def _log(event: str, *, level: str = "info", **fields: Any) -> None:
    logline.write("worker", event, level=level, **fields)


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()


class Worker:
    """Serves one model over a control socket and a shared segment holding two rings."""

    def __init__(self, sock: socket.socket, *, preload: Sequence[str] = (), forked: bool = False) -> None:
        self.sock = sock
        self.channel = Channel(sock)
        self.preload = tuple(preload)
        self.forked = forked
        self.shm: Any = None
        self.pipeline: Pipeline | None = None
        self.streams = 1
        """Batches run at once (1, or `stream_count` for a concurrent pipeline)."""
        self._out_lock = threading.Lock()
        """Held from reserving a result's spans to sending its `Result`: spans are announced in the
        order they were reserved, and the supervisor releases them in that order."""
        self._share = ThreadShare(1, 1)
        self._order = ReleaseInOrder(self._release)
        self._debug = logline.enabled("debug")
        """Whether each batch gets a debug line (read once: the level is fixed for the process)."""

    def recv(self) -> m.Message | None:
        return self.channel.recv()

    def send(self, msg: m.Message) -> None:
        self.channel.send(msg)

    def setup(self, load: m.Load) -> None:
        self.shm = attach(load.segment)
        buf = self.shm.buf
        req_size = ShmRing.region_size(load.request_ring_bytes)
        self.requests = ShmRing(buf[:req_size], load.request_ring_bytes)
        self.responses = ShmRing(
            buf[req_size : req_size + ShmRing.region_size(load.response_ring_bytes)], load.response_ring_bytes
        )
        self.large = AttachedSegments()

    def run(self) -> int:
        self.send(m.Hello(m.PROTOCOL_VERSION, os.getpid()))
        first = self.recv()
        if not isinstance(first, m.Load):
            return 2
        self.channel.start_heartbeat(first.heartbeat_s)
        logline.bind(model=first.model_id, version=first.version)
        try:
            self.setup(first)
            t0 = time.perf_counter()
            preload(self.preload)
            cls = pipeline_class(first.pipeline)
            release_tokenizer_threads(first.threads)
            t1 = time.perf_counter()
            self.pipeline = cls(first.path, device=first.device, dtype=first.dtype, options={})
            if getattr(self.pipeline, "concurrent", False):
                self.streams = stream_count(first.streams, str(self.pipeline.device), first.threads)
            set_torch_threads(max(1, first.threads))  # inference runs on this thread with an explicit thread count
            t2 = time.perf_counter()
            self.send(m.Phase("warming"))
            self.pipeline.warmup()
            t3 = time.perf_counter()
        except Exception as exc:  # the supervisor reports it; we exit
            # one error event per failed load, the traceback in it (not printed beside it)
            _log("load_failed", level="error", error=f"{type(exc).__name__}: {exc}", traceback=_traceback(exc))
            self.send(m.Error(-1, m.ErrorCode.MODEL_LOAD_FAILED, f"{type(exc).__name__}: {exc}"))
            return 1
        import psutil

        rss = psutil.Process().memory_info().rss
        self.send(
            m.Loaded(
                load_ms=(t2 - t1) * 1e3,
                warmup_ms=(t3 - t2) * 1e3,
                rss_bytes=rss,
                device=self.pipeline.device,
                import_ms=(t1 - t0) * 1e3,
                forked=self.forked,
                vram_bytes=vram_bytes(self.pipeline),
                streams=self.streams,
            )
        )
        _log("ready", device=self.pipeline.device)
        self.channel.start_reader()
        self._share = ThreadShare(first.threads, self.streams)
        streams = Streams(self.streams, self.infer)
        streams.start()
        while True:
            msg = self.recv()
            match msg:
                case m.Infer():
                    self._order.accept(msg)
                    streams.submit(msg)
                case m.Shutdown() | None:
                    streams.stop()
                    release_gpu_memory()
                    return 0
                case _:
                    _log("unexpected_message", type=type(msg).__name__)

    def _release(self, span: m.Span) -> None:
        self.requests.release(span)

    def _view(self, span: m.Span) -> memoryview:
        if not span.seg:
            return self.requests.view(span)
        return self.large.get(span.seg)[span.start : span.start + span.nbytes]

    def _reserve(self, nbytes: int) -> tuple[m.Span, memoryview]:
        delay = 0.0001
        while True:
            try:
                return self.responses.reserve_nowait(nbytes)
            except RingFull:
                time.sleep(delay)  # the supervisor releases as soon as it reads a result
                delay = min(delay * 2, _RING_WAIT_MAX_S)

    def _emit(self, batch_id: int) -> events.Sink:
        def send(item: int, kind: str, data: dict[str, Any]) -> None:
            self.send(m.Event(batch_id, item, kind, data))

        return send

    def infer(self, msg: m.Infer) -> None:
        assert self.pipeline is not None
        t0 = time.perf_counter()
        self._share.begin()
        try:
            inputs = {name: payloads.decode(item, self._view(item.span)) for name, item in msg.inputs.items()}
            with cancel.running(msg.batch_id), events.sink(self._emit(msg.batch_id)):
                outputs = self.pipeline.run(inputs, msg.params)
            del inputs
        except cancel.Cancelled:
            _log("batch_cancelled", batch=msg.batch_id, trace_ids=msg.trace_ids)
            self.send(m.Error(msg.batch_id, m.ErrorCode.CANCELLED, "cancelled by the supervisor"))
            return
        except InputError as exc:
            _log("batch_refused", level="debug", batch=msg.batch_id, trace_ids=msg.trace_ids, error=str(exc))
            self.send(m.Error(msg.batch_id, m.ErrorCode.INVALID_INPUT, str(exc), exc.field or ""))
            return
        except Exception as exc:
            self._failed(msg, exc)
            self.send(m.Error(msg.batch_id, m.ErrorCode.INFERENCE_FAILED, f"{type(exc).__name__}: {exc}"))
            return
        finally:
            self._share.end()
            self._order.done(msg)
        with self._out_lock:
            try:
                encoded = {name: payloads.encode(value, self._reserve) for name, value in outputs.items()}
            except ExceedsRing as exc:
                self.send(m.Error(msg.batch_id, m.ErrorCode.RESULT_TOO_LARGE, f"{exc}; raise response_ring_mb"))
                return
            except (TypeError, ValueError) as exc:  # outputs the protocol cannot carry
                self._failed(msg, exc)
                self.send(m.Error(msg.batch_id, m.ErrorCode.INFERENCE_FAILED, f"{type(exc).__name__}: {exc}"))
                return
            elapsed_ms = (time.perf_counter() - t0) * 1e3
            self.send(m.Result(msg.batch_id, encoded, elapsed_ms, vram_bytes(self.pipeline)))
        if self._debug:
            _log(
                "batch_done",
                level="debug",
                batch=msg.batch_id,
                items=len(next(iter(outputs.values()), ())),
                infer_ms=round(elapsed_ms, 3),
                trace_ids=msg.trace_ids,
            )

    @staticmethod
    def _failed(msg: m.Infer, exc: BaseException) -> None:
        """One error line for a failed batch: its requests' trace ids and the traceback."""
        _log(
            "batch_failed",
            level="error",
            batch=msg.batch_id,
            trace_ids=msg.trace_ids,
            error=f"{type(exc).__name__}: {exc}",
            traceback=_traceback(exc),
        )

    def close(self) -> None:
        self.channel.close()
        if self.shm is not None:
            self.requests.close()
            self.responses.close()
            self.large.close()
            self.shm.close()


def serve(fd: int, *, ppid: int, preload: Sequence[str] = (), forked: bool = False) -> int:
    """Serve the control socket `fd` until told to stop; returns the exit status.

    Args:
        fd: the worker's end of its control socket pair (this function closes it).
        ppid: the pid of the parent the worker must die with (supervisor or zygote).
        preload: modules to import before the pipeline (timed as `import_ms`).
        forked: whether this process was forked from the zygote (reported in `Loaded.forked`).
    """
    die_with_parent(ppid, forked=forked)
    hold_tokenizer_threads()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    worker = Worker(sock, preload=preload, forked=forked)
    try:
        return worker.run()
    except (BrokenPipeError, ConnectionResetError):
        return 0
    finally:
        with contextlib.suppress(BufferError):
            worker.close()
        sock.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m modelmora_workers --fd N --ppid P [--preload mod1,mod2]`."""
    logline.configure()
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    modules = [name for name in opts.get("--preload", "").split(",") if name]
    return serve(int(opts["--fd"]), ppid=int(opts.get("--ppid", os.getppid())), preload=modules)
