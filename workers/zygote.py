"""The zygote: imports the model libraries once, then forks one worker per request.

Started by the supervisor (`modelmora.lifecycle.ZygoteLauncher`) as
`python -m modelmora_workers.zygote --fd N --ppid P [--preload torch,...] [--grace S]`, with
the environment every worker gets. It imports the preload list (a failed import is reported,
not fatal), freezes the garbage collector's view of those objects (so that children do not
dirty the shared pages by scanning them), says `Ready`, and then serves its control socket
(see `modelmora.ipc.zygote`) and reaps its children in one `poll` loop, single-threaded:

- `Fork` + a socket: fork; the child becomes a normal worker (`worker.serve`) on that socket;
  the zygote closes its copy and answers `Forked` with a pidfd of the child.
- a child's pidfd turns readable: the child exited; `waitpid` it and report `Exited`.
- EOF on the control socket: the supervisor is done with us; give children still exiting
  `--grace` seconds, then exit (children still running die with us: PR_SET_PDEATHSIG).

The zygote never initialises CUDA (a CUDA context does not survive `fork`): it calls nothing
in `torch.cuda` (and has torch ask NVML, not the driver, whether a GPU is there), and reports
`cuda_initialised` when an import initialised the driver anyway, so that the supervisor refuses
it. A child may use the GPU: its own CUDA context starts after the fork.

Each child, before serving: closes the zygote's descriptors (control socket, siblings'
pidfds), dies with the zygote (PR_SET_PDEATHSIG; the zygote dies with the supervisor),
restores the signal handlers a fresh worker would have, re-seeds `random`, numpy and torch
(children must not share a random stream), and applies the environment difference the
supervisor sent. It never returns into the zygote's loop: it ends with `os._exit`, after
saving coverage data when coverage measures it (an `_exit` skips the atexit hook that would).
The zygote itself ends the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import os
import random
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from modelmora.ipc import zygote as zw
from modelmora.ipc.control import ProtocolError

from . import logline
from .process import die_with_parent, hold_tokenizer_threads, parse_args, preload
from .worker import serve

__all__ = (
    "ALWAYS_PRELOADED",
    "Zygote",
    "apply_env",
    "cuda_initialised",
    "exit_now",
    "main",
    "reseed",
    "restore_signal_handlers",
    "save_coverage",
    "signal_handlers",
)

ALWAYS_PRELOADED = ("numpy", "psutil", "msgspec")
"""Imported by every zygote whatever the configured list: every worker needs them."""

_PR_SET_NAME = 15
Handlers = dict[int, Callable[[int, Any], Any] | int]


def _log(event: str, **fields: Any) -> None:
    logline.write("zygote", event, **fields)


def _set_name(name: bytes) -> None:
    """Set the process name that `ps -o comm` and `top` show (Linux; best effort)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(name[:15]))


def signal_handlers() -> Handlers:
    """The Python-level handler of every catchable signal (those set from C are left out)."""
    out: Handlers = {}
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError):
            handler = signal.getsignal(sig)
            if handler is not None:
                out[sig] = handler
    return out


def restore_signal_handlers(handlers: Handlers) -> None:
    """Put back `handlers` where they changed, and unblock every signal."""
    for sig, handler in handlers.items():
        if signal.getsignal(sig) != handler:
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def reseed() -> None:
    """Give this process its own random streams (a fork copies the parent's generator states)."""
    random.seed()
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.seed()  # CPU now; CUDA generators lazily, when (if) this process initialises CUDA


def apply_env(env: Mapping[str, str], unset: Sequence[str]) -> None:
    """Apply an environment difference; PYTHONPATH entries also join `sys.path`, as at start-up."""
    os.environ.update(env)
    for key in unset:
        os.environ.pop(key, None)
    if "PYTHONPATH" in env:
        new = [p for p in env["PYTHONPATH"].split(os.pathsep) if p and p not in sys.path]
        sys.path[1:1] = new
        importlib.invalidate_caches()


CUDA_ERROR_NOT_INITIALIZED = 3


def cuda_initialised(maps: str = "/proc/self/maps", load: Callable[[str], Any] = ctypes.CDLL) -> bool:
    """Whether an import initialised the CUDA driver (`cuInit`), which forked workers cannot inherit.

    The driver library being mapped is not enough: a CUDA build of torch may load it at import
    without initialising it. So the library already mapped is asked: `cuDeviceGetCount` answers
    CUDA_ERROR_NOT_INITIALIZED until `cuInit` ran, and initialises nothing itself. A library
    that cannot be asked counts as initialised.
    """
    try:
        with open(maps) as f:
            paths = sorted({line.split()[-1] for line in f if "libcuda.so" in line})
    except OSError:  # pragma: no cover - not Linux
        return False
    for path in paths:
        try:
            count = ctypes.c_int(0)
            return int(load(path).cuDeviceGetCount(ctypes.byref(count))) != CUDA_ERROR_NOT_INITIALIZED
        except (OSError, AttributeError):
            return True
    return False


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # pragma: no cover - not Linux
        return 1


def save_coverage() -> None:
    """Save this process's coverage data, when coverage measures it (before an `os._exit`)."""
    cov_module = sys.modules.get("coverage")
    cov = cov_module.Coverage.current() if cov_module is not None else None
    if cov is not None:
        with contextlib.suppress(Exception):
            cov.stop()
            cov.save()  # pragma: no cover - runs after coverage stopped


def exit_now(code: int) -> NoReturn:
    """Exit without interpreter finalisation: for a forked child, without running the
    zygote's atexit hooks or unwinding its stack; for the zygote, without the slow (and
    noisy: native extensions report "leaks") teardown of everything it imported."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    save_coverage()
    os._exit(code)  # pragma: no cover - runs after coverage stopped


class Zygote:
    """The fork server loop over the control socket `sock`.

    Args:
        sock: the zygote's end of its `SOCK_SEQPACKET` pair with the supervisor.
        modules: what to import before serving (after `ALWAYS_PRELOADED`).
        handlers: the signal handlers the process started with, restored in each child.
        grace_s: at EOF, how long children still running may take to exit before the
            zygote exits (and so kills them).
    """

    def __init__(self, sock: socket.socket, modules: Sequence[str], handlers: Handlers, grace_s: float = 2.0) -> None:
        self.sock = sock
        self.modules = tuple(modules)
        self.grace_s = grace_s
        self.handlers = handlers
        self.pid = os.getpid()
        self.children: dict[int, int] = {}  # pidfd -> pid
        self.poller = select.poll()

    def start(self) -> zw.Ready:
        """Import the preload list; the `Ready` message describing the result."""
        times, failed = preload((*ALWAYS_PRELOADED, *self.modules))
        gc.collect()
        gc.freeze()  # children never scan (and so never copy) the pages of what is imported now
        import psutil

        return zw.Ready(
            zw.ZYGOTE_PROTOCOL,
            self.pid,
            times,
            failed,
            _thread_count(),
            cuda_initialised(),
            psutil.Process().memory_info().rss,
        )

    def run(self) -> int:
        """Preload, say `Ready`, then serve until the supervisor closes the socket."""
        ready = self.start()
        _log("ready", modules=",".join(self.modules), import_ms=round(sum(ready.import_ms.values())))
        zw.send_packet(self.sock, ready)
        sock_fd = self.sock.fileno()
        self.poller.register(sock_fd, select.POLLIN)
        while True:
            for fd, _ in self.poller.poll():
                if fd != sock_fd:
                    self._reap(fd)
                elif not self._serve_request():
                    self.poller.unregister(sock_fd)
                    self._drain()
                    return 0

    def _drain(self) -> None:
        """Give children still exiting (e.g. saving their data) `grace_s` to finish, reaping them."""
        deadline = time.monotonic() + self.grace_s
        while self.children and (left := deadline - time.monotonic()) > 0:
            for fd, _ in self.poller.poll(left * 1000):
                self._reap(fd, report=False)

    def _serve_request(self) -> bool:
        try:
            msg, fds = zw.recv_packet(self.sock)
        except ProtocolError as exc:
            _log("protocol_error", error=str(exc))
            return False
        if msg is None:
            return False
        if not isinstance(msg, zw.Fork) or len(fds) != 1:
            zw.close_fds(fds)
            _log("bad_request", type=type(msg).__name__, fds=len(fds))
            if isinstance(msg, zw.Fork):
                zw.send_packet(self.sock, zw.ForkFailed(msg.request_id, "a fork request carries exactly one socket"))
            return True
        self._fork(msg, fds[0])
        return True

    def _fork(self, msg: zw.Fork, fd: int) -> None:
        for stream in (sys.stdout, sys.stderr):  # or the child would write buffered output again
            stream.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(fd)
            zw.send_packet(self.sock, zw.ForkFailed(msg.request_id, f"fork failed: {exc}"))
            return
        if pid == 0:
            self._become_worker(msg, fd)
        os.close(fd)
        pidfd = os.pidfd_open(pid)  # before any waitpid: the pid cannot be reused yet
        self.children[pidfd] = pid
        self.poller.register(pidfd, select.POLLIN)
        zw.send_packet(self.sock, zw.Forked(msg.request_id, pid), [pidfd])

    def _reap(self, pidfd: int, *, report: bool = True) -> None:
        pid = self.children.pop(pidfd)
        self.poller.unregister(pidfd)
        _, status = os.waitpid(pid, 0)  # the pidfd is readable: the child has exited
        os.close(pidfd)
        if report:
            zw.send_packet(self.sock, zw.Exited(pid, os.waitstatus_to_exitcode(status)))

    def _become_worker(self, msg: zw.Fork, fd: int) -> NoReturn:
        code = 1
        try:
            self.sock.close()
            for pidfd in self.children:
                os.close(pidfd)
            self.children.clear()
            _set_name(b"mm-worker")
            restore_signal_handlers(self.handlers)
            reseed()
            apply_env(msg.env, msg.unset)
            code = serve(fd, ppid=self.pid, preload=self.modules, forked=True)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                trace = "".join(traceback.format_exception(exc)).rstrip()
                logline.write("worker", "worker_failed", level="error", error=repr(exc), traceback=trace)
        finally:
            exit_now(code)

    def close(self) -> None:
        """Release the zygote's descriptors (its children die with it)."""
        for pidfd in self.children:
            with contextlib.suppress(OSError):
                os.close(pidfd)
        self.children.clear()
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m modelmora_workers.zygote --fd N --ppid P [--preload mod1,mod2] [--grace S]`."""
    handlers = signal_handlers()  # before we change any: what a freshly spawned worker has
    logline.configure()
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    die_with_parent(int(opts.get("--ppid", os.getppid())))
    _set_name(b"mm-zygote")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    hold_tokenizer_threads()
    # torch.cuda.is_available(), which model libraries call as they are imported, asks NVML
    # rather than the CUDA driver: an initialised driver is not inherited by forked workers
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    sock = socket.socket(fileno=int(opts["--fd"]))
    sock.setblocking(True)
    modules = [name for name in opts.get("--preload", "").split(",") if name]
    zygote = Zygote(sock, modules, handlers, float(opts.get("--grace", "2")))
    try:
        return zygote.run()
    except (BrokenPipeError, ConnectionResetError):
        return 0
    finally:
        zygote.close()


if __name__ == "__main__":
    exit_now(main())
