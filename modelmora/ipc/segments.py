"""Shared-memory segments: naming, creation, attachment and clean-up.

The supervisor owns every segment: it creates it, and unlinks it when the worker using it
ends, however it ends. Names carry the owning server's instance id,
``mm-<pid>-<random>-<label>-<random>``, so that a server starting up can remove the segments
of a server that died (SIGKILL leaves no chance to clean up) without touching a live one's.

Payloads larger than a ring travel in large segments, reused through the pool in `pool`.

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
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

__all__ = (
    "PREFIX",
    "SHM_DIR",
    "SharedMemoryExhausted",
    "ShmRoom",
    "attach",
    "close",
    "create",
    "ensure_room",
    "new_instance_id",
    "our_segments",
    "remove_stale",
    "shm_room",
    "unlink",
)

PREFIX = "mm-"
SHM_DIR = Path("/dev/shm")
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
