"""Process set-up shared by the worker and the zygote, and the worker's process-wide helpers.

Both kinds of process die with their parent (`die_with_parent`), read the `--key value`
arguments the supervisor's launcher wrote (`parse_args`), import a preload list without
failing on a missing library (`preload`), and keep the Rust tokenizers single-threaded until a
worker knows its CPU share (`hold_tokenizer_threads` / `release_tokenizer_threads`: a process
that forks must not have started their thread pool). The worker also imports its pipeline
class (`pipeline_class`), sets its torch thread count (`set_torch_threads`), reports the GPU
memory it holds (`vram_bytes`) and hands cached GPU memory back before it ends
(`release_gpu_memory`). Nothing here imports torch: it is used only where a pipeline did.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from . import logline

__all__ = (
    "die_with_parent",
    "hold_tokenizer_threads",
    "parse_args",
    "pipeline_class",
    "preload",
    "release_gpu_memory",
    "release_tokenizer_threads",
    "set_torch_threads",
    "vram_bytes",
)


def _log(event: str, **fields: Any) -> None:
    logline.write("worker", event, **fields)


def die_with_parent(expected_ppid: int, *, forked: bool = False) -> None:
    """Die (SIGKILL) when our parent dies; exit now if it already has.

    The parent is the supervisor for the zygote and for a spawned worker, the zygote for a
    forked one: a supervisor's death takes the zygote down, and so every forked worker.

    A forked worker uses PR_SET_PDEATHSIG: the zygote forks from its main thread. The kernel ties
    that signal to the parent *thread* that created the process, and a supervisor may start its
    children from a short-lived thread (trio starts processes from its thread pool, whose idle
    threads end after 10 s, which killed the zygote): so a child of the supervisor watches the
    supervisor's process itself instead, through a pidfd, from a daemon thread.
    """
    if (forked or not _watch_parent(expected_ppid)) and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - non-glibc systems
            pass
    if os.getppid() != expected_ppid:
        os._exit(1)


def _watch_parent(ppid: int) -> bool:
    """Start a daemon thread that SIGKILLs this process when `ppid` ends; False where pidfds are
    not available (the caller falls back to PR_SET_PDEATHSIG)."""
    try:
        pidfd = os.pidfd_open(ppid)
    except (AttributeError, OSError):  # pragma: no cover - before Linux 5.3 / Python 3.9, or not Linux
        return False

    def watch() -> None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while not poller.poll():  # readable once the parent has exited
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    return True


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    """`--key value` pairs (the launcher writes them; no user ever does)."""
    return dict(zip(argv[::2], argv[1::2], strict=False))


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


def pipeline_class(spec: str) -> Any:
    """Import the module of "module:Class" and return the class."""
    module_name, _, cls_name = spec.partition(":")
    return getattr(importlib.import_module(module_name), cls_name)


def set_torch_threads(count: int) -> bool:
    """Set the calling thread's torch thread count (it is per thread); False when torch is not
    imported (yet: a pipeline may import it later), so nothing was set."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    torch.set_num_threads(count)
    return True


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
