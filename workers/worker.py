"""The worker loop: control message -> read ring -> pipeline -> write ring -> Result.

One worker process serves one model version. Inference runs on this process's main
thread (one dedicated thread, torch thread count set explicitly), or, for a pipeline that
declares `concurrent = True` when the supervisor asks for several streams (`Load.streams`), on
that many dedicated threads, each running whole batches: on all the torch threads when it runs
alone, on its share of them beside another.
Batches may then finish out of order: request-ring spans are released in arrival order
(`_accept`/`_done`), and each result is written and announced under one lock, so that both rings
keep their write-order release rule. The worker exits when
told to (`Shutdown`), when the supervisor closes the control channel, or when its parent
dies (PR_SET_PDEATHSIG on Linux): the supervisor for a spawned worker
(`python -m modelmora_workers`), the zygote for a forked one (`modelmora_workers.zygote`),
which itself dies with the supervisor.

Liveness: from the `Load` message on, a thread of its own sends a `Heartbeat` every
`Load.heartbeat_s` while the process runs (whatever the pipeline computes), so that the
supervisor can tell a stalled worker (stopped, or hung in a system call) from a busy one.

Start-up, as reported in `Loaded`: `import_ms` (the preloaded libraries and the pipeline's
module; near zero in a worker forked from the zygote, which imported them already),
`load_ms` (constructing the pipeline: reading the weights) and `warmup_ms` (the test inference).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

from modelmora.ipc import messages as m
from modelmora.ipc.control import FrameDecoder, recv_message, send_message
from modelmora.ipc.ring import ExceedsRing, RingFull, ShmRing
from modelmora.ipc.segments import AttachedSegments, attach

from . import cancel, events, logline, payloads
from .pipelines.base import InputError, Pipeline

__all__ = (
    "Worker",
    "die_with_parent",
    "hold_tokenizer_threads",
    "main",
    "parse_args",
    "pipeline_class",
    "preload",
    "release_gpu_memory",
    "release_tokenizer_threads",
    "serve",
    "stream_count",
    "vram_bytes",
)

_RING_WAIT_MAX_S = 0.005


def die_with_parent(expected_ppid: int) -> None:
    """Ask the kernel to SIGKILL us when our parent dies; exit now if it already has.

    The parent is the supervisor for the zygote and for a spawned worker, the zygote for a
    forked one: a supervisor's death takes the zygote down, and so every forked worker.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - non-glibc systems
            pass
    if os.getppid() != expected_ppid:
        os._exit(1)


def _log(event: str, **fields: Any) -> None:
    logline.write("worker", event, **fields)


def preload(modules: Iterable[str]) -> tuple[dict[str, float], dict[str, str]]:
    """Import `modules` in order; a module that fails is reported, not fatal.

    Returns:
        The milliseconds each import took, and the error of each module that failed.
    """
    times: dict[str, float] = {}
    failed: dict[str, str] = {}
    for name in modules:
        t0 = time.perf_counter()
        try:
            importlib.import_module(name)
        except Exception as exc:  # an optional library missing must not take the worker down
            failed[name] = f"{type(exc).__name__}: {exc}"
            _log("preload_failed", module=name, error=repr(exc))
        times[name] = (time.perf_counter() - t0) * 1e3
    return times, failed


_TOKENIZER_THREADS_HELD = False


def hold_tokenizer_threads() -> None:
    """Keep the Rust tokenizers single-threaded until `release_tokenizer_threads`: a process
    that will fork (the zygote) must not have started their thread pool. A value the user set
    for TOKENIZERS_PARALLELISM is left alone, here and at release."""
    global _TOKENIZER_THREADS_HELD
    if "TOKENIZERS_PARALLELISM" not in os.environ:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        _TOKENIZER_THREADS_HELD = True


def release_tokenizer_threads(threads: int) -> None:
    """Let the tokenizers split a batch's texts over `threads` threads (the worker's CPU share;
    RAYON_NUM_THREADS sizes their pool when it first starts). Tokenizing 64 documents of 256
    tokens took 40-80 ms on one thread: on a GPU that is as long as the forward pass itself."""
    global _TOKENIZER_THREADS_HELD
    if _TOKENIZER_THREADS_HELD:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, threads)))
        _TOKENIZER_THREADS_HELD = False


def stream_count(asked: int, device: str, threads: int) -> int:
    """How many batches a concurrent pipeline runs at once: `asked`, or for 0 two on a GPU (one
    tokenizes while the other runs there) and one on a CPU. On a CPU each needs a thread."""
    count = asked if asked > 0 else (2 if device.startswith("cuda") else 1)
    return max(1, count if device.startswith("cuda") else min(count, threads))


def release_gpu_memory() -> None:
    """On a GPU worker, hand cached CUDA memory back before the process ends."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # pragma: no cover - needs a GPU
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def vram_bytes(pipeline: Any) -> int:
    """GPU memory this process holds: the pipeline's own figure (`vram_bytes`, for pipelines that
    manage memory outside torch's allocator), else torch's reserved CUDA pool; 0 on the CPU."""
    own = getattr(pipeline, "vram_bytes", None)
    if own is not None:
        return int(own)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # pragma: no cover - needs a GPU
        return int(sum(torch.cuda.memory_reserved(i) for i in range(torch.cuda.device_count())))
    return 0


def pipeline_class(spec: str) -> Any:
    """Import the module of "module:Class" and return the class."""
    module_name, _, cls_name = spec.partition(":")
    return getattr(importlib.import_module(module_name), cls_name)


class Worker:
    """Serves one model over a control socket and a shared segment holding two rings."""

    def __init__(self, sock: socket.socket, *, preload: Sequence[str] = (), forked: bool = False) -> None:
        self.sock = sock
        self.preload = tuple(preload)
        self.forked = forked
        self.decoder = FrameDecoder()
        self.backlog: list[m.Message] = []
        self.shm: Any = None
        self.pipeline: Pipeline | None = None
        self.streams = 1
        self._inbox: queue.SimpleQueue[m.Message | None] | None = None
        self._send_lock = threading.Lock()
        self._out_lock = threading.Lock()
        """Held from reserving a result's spans to sending its `Result`: spans are announced in the
        order they were reserved, and the supervisor releases them in that order."""
        self._release_lock = threading.Lock()
        self._pending: dict[int, tuple[m.Infer, bool]] = {}
        """Batches in arrival order (= the order of their request-ring spans), and whether done."""
        self._active_lock = threading.Lock()
        self._active = 0
        """Batches in the pipeline now."""
        self._threads = 1
        """Torch threads of a batch that runs alone (`torch_threads`)."""
        self._share = 1
        """Torch threads of a batch that starts beside others (`torch_threads // streams`)."""
        self._local = threading.local()
        """Per inference thread: the torch thread count it last set."""
        self._stopping = threading.Event()
        """Set when the worker ends: the heartbeat thread stops."""

    def recv(self) -> m.Message | None:
        if self._inbox is not None:
            return self._inbox.get()
        return recv_message(self.sock, self.decoder, self.backlog)

    def _read_control(self) -> None:
        """Control reader thread: cancel flags take effect at once, the rest goes to the inbox."""
        assert self._inbox is not None
        try:
            while True:
                msg = recv_message(self.sock, self.decoder, self.backlog)
                if isinstance(msg, m.Cancel):
                    cancel.request(msg.batch_id)
                    continue
                self._inbox.put(msg)
                if msg is None or isinstance(msg, m.Shutdown):
                    return
        except OSError:
            self._inbox.put(None)

    def start_reader(self) -> None:
        self._inbox = queue.SimpleQueue()
        threading.Thread(target=self._read_control, name="control-reader", daemon=True).start()

    def send(self, msg: m.Message) -> None:
        with self._send_lock:
            send_message(self.sock, msg)

    def start_heartbeat(self, interval_s: float) -> None:
        """Send a `Heartbeat` every `interval_s` from a daemon thread until the worker ends (0: never)."""
        if interval_s <= 0:
            return

        def beat() -> None:
            while not self._stopping.wait(interval_s):
                try:
                    self.send(m.Heartbeat())
                except OSError:  # the supervisor closed the channel: the main thread sees it too
                    return

        threading.Thread(target=beat, name="heartbeat", daemon=True).start()

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
        self.start_heartbeat(first.heartbeat_s)
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
            if "torch" in sys.modules:  # inference runs on this thread with an explicit thread count
                sys.modules["torch"].set_num_threads(max(1, first.threads))
            t2 = time.perf_counter()
            self.send(m.Phase("warming"))
            self.pipeline.warmup()
            t3 = time.perf_counter()
        except Exception as exc:  # the supervisor reports it; we exit
            _log("load_failed", model=first.model_id, error=repr(exc))
            traceback.print_exc()
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
        _log("ready", model=first.model_id, version=first.version, device=self.pipeline.device)
        self.start_reader()
        work: queue.SimpleQueue[m.Infer | None] = queue.SimpleQueue()
        self._threads = max(1, first.threads)
        self._share = max(1, first.threads // self.streams)
        streams = [
            threading.Thread(target=self._stream, args=(work,), name=f"stream-{i}")
            for i in range(self.streams if self.streams > 1 else 0)
        ]
        for thread in streams:
            thread.start()
        while True:
            msg = self.recv()
            match msg:
                case m.Infer():
                    self._accept(msg)
                    if streams:
                        work.put(msg)
                    else:
                        self.infer(msg)
                case m.Shutdown() | None:
                    for _ in streams:
                        work.put(None)
                    for thread in streams:
                        thread.join()
                    release_gpu_memory()
                    return 0
                case _:
                    _log("unexpected_message", type=type(msg).__name__)

    def _stream(self, work: queue.SimpleQueue[m.Infer | None]) -> None:
        """One inference stream: whole batches, one after the other."""
        while (msg := work.get()) is not None:
            self.infer(msg)

    def _begin(self) -> None:
        """Count a batch as running, and give this thread its torch threads: all of them when the
        batch runs alone (light load loses nothing to the streams), its share beside others
        (torch's thread count is per thread)."""
        with self._active_lock:
            self._active += 1
            count = self._threads if self._active == 1 else self._share
        torch = sys.modules.get("torch")
        if torch is not None and count != getattr(self._local, "threads", 0):
            torch.set_num_threads(count)
            self._local.threads = count

    def _end(self) -> None:
        with self._active_lock:
            self._active -= 1

    def _accept(self, msg: m.Infer) -> None:
        """Note a batch as it arrives (before any later batch: arrival order is span order)."""
        with self._release_lock:
            self._pending[msg.batch_id] = (msg, False)

    def _done(self, msg: m.Infer) -> None:
        """The batch no longer reads its inputs: release its request-ring spans, and those of every
        batch before it that is done too (a span's release also releases all spans before it)."""
        with self._release_lock:
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
                        self.requests.release(item.span)

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
        self._begin()
        try:
            inputs = {name: payloads.decode(item, self._view(item.span)) for name, item in msg.inputs.items()}
            with cancel.running(msg.batch_id), events.sink(self._emit(msg.batch_id)):
                outputs = self.pipeline.run(inputs, msg.params)
            del inputs
        except cancel.Cancelled:
            self.send(m.Error(msg.batch_id, m.ErrorCode.CANCELLED, "cancelled by the supervisor"))
            return
        except InputError as exc:
            self.send(m.Error(msg.batch_id, m.ErrorCode.INVALID_INPUT, str(exc), exc.field or ""))
            return
        except Exception as exc:
            traceback.print_exc()
            self.send(m.Error(msg.batch_id, m.ErrorCode.INFERENCE_FAILED, f"{type(exc).__name__}: {exc}"))
            return
        finally:
            self._end()
            self._done(msg)
        with self._out_lock:
            try:
                encoded = {name: payloads.encode(value, self._reserve) for name, value in outputs.items()}
            except ExceedsRing as exc:
                self.send(m.Error(msg.batch_id, m.ErrorCode.RESULT_TOO_LARGE, f"{exc}; raise response_ring_mb"))
                return
            except (TypeError, ValueError) as exc:  # outputs the protocol cannot carry
                traceback.print_exc()
                self.send(m.Error(msg.batch_id, m.ErrorCode.INFERENCE_FAILED, f"{type(exc).__name__}: {exc}"))
                return
            elapsed_ms = (time.perf_counter() - t0) * 1e3
            self.send(m.Result(msg.batch_id, encoded, elapsed_ms, vram_bytes(self.pipeline)))

    def close(self) -> None:
        self._stopping.set()
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
    die_with_parent(ppid)
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


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    """`--key value` pairs (the launcher writes them; no user ever does)."""
    return dict(zip(argv[::2], argv[1::2], strict=False))


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m modelmora_workers --fd N --ppid P [--preload mod1,mod2]`."""
    logline.configure()
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    modules = [name for name in opts.get("--preload", "").split(",") if name]
    return serve(int(opts["--fd"]), ppid=int(opts.get("--ppid", os.getppid())), preload=modules)
