"""The start-up check of /dev/shm: a server whose workers' rings cannot fit refuses to start.

Docker and podman give a container 64 MiB of /dev/shm unless it runs with `--shm-size`, and
Kubernetes gives a pod the same unless a memory-backed emptyDir is mounted there: too small for
the default rings. Without this check such a server would start and then fail its first load
with 503 `model_load_failed`; with it, `mm serve` stops with one line that says what to change.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from .config import ModelSettings, Settings
from .ipc.ring import ShmRing
from .ipc.segments import SHM_DIR
from .registry import ModelStore

__all__ = (
    "ShmShortage",
    "check_shm_room",
    "check_store_shm",
    "preloaded_models",
    "ring_bytes",
    "shm_needs",
    "workers_at_once",
)

_MiB = 1 << 20


class ShmShortage(Exception):
    """/dev/shm has less free room than the server's rings need; the message is one line."""


def preloaded_models(settings: Iterable[dict[str, Any]]) -> int:
    """How many of the registered models (their `settings` as the registry keeps them) are
    loaded at start (`preload`)."""
    return sum(1 for s in settings if msgspec.convert(s, ModelSettings).preload)


def workers_at_once(preloaded: int) -> int:
    """The workers whose rings the server must be able to hold at once: every preloaded model
    (at least one model), plus one: a model being reloaded (a new active version, or changed files
    or device settings) has its new worker started while the old one still serves."""
    return max(preloaded, 1) + 1


def ring_bytes(settings: Settings) -> int:
    """The shared memory of one worker: one segment holding its request ring (`request_ring_mb`)
    and its response ring (`response_ring_mb`), each with its header, rounded up to whole pages."""
    size = ShmRing.region_size(settings.request_ring_mb * _MiB) + ShmRing.region_size(settings.response_ring_mb * _MiB)
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


def shm_needs(settings: Settings, preloaded: int = 0) -> int:
    """Bytes of /dev/shm the server needs free to start: `workers_at_once(preloaded)` x
    `ring_bytes(settings)`.

    With the defaults (16 MiB rings, no model preloaded) that is 2 x (32 MiB + two headers, rounded
    to a page) = 64 MiB + 8 KiB: more than the 64 MiB a container gets by default, on purpose, since
    a reload there would fail. Payloads larger than a ring travel in segments made on demand (a
    request finding no room for one gets 503 `shared_memory_exhausted`, the server goes on): they
    are not counted here, so the suggested `--shm-size` leaves room for them.
    """
    return workers_at_once(preloaded) * ring_bytes(settings)


@dataclass(frozen=True, slots=True)
class _Room:
    total: int
    free: int


def _room(directory: Path) -> _Room | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return _Room(total=st.f_blocks * st.f_frsize, free=st.f_bavail * st.f_frsize)


def _mib(nbytes: int) -> str:
    return f"{nbytes / _MiB:.1f} MiB"


def check_shm_room(settings: Settings, preloaded: int = 0, directory: Path = SHM_DIR) -> None:
    """Raise `ShmShortage` unless `directory` (/dev/shm) has `shm_needs(settings, preloaded)`
    bytes free; does nothing where it cannot be measured.

    Raises:
        ShmShortage: one line naming /dev/shm, the MiB free and needed, the settings that size the
            rings, and the remedies (`--shm-size`, a memory-backed emptyDir, smaller rings).
    """
    room = _room(directory)
    needed = shm_needs(settings, preloaded)
    if room is None or needed <= room.free:
        return
    workers = workers_at_once(preloaded)
    why = (
        f"{preloaded} preloaded models and one reloading"
        if preloaded > 1
        else "a model and the new worker of its reload"
    )
    suggest = 1 << max(6, math.ceil(math.log2(needed / _MiB + 1)))  # MiB, a power of two with room to spare
    raise ShmShortage(
        f"{directory} has {_mib(room.free)} free ({room.free} bytes, of {_mib(room.total)}) but the server needs"
        f" {_mib(needed)} ({needed} bytes): the shared-memory rings of {workers} workers ({why}), each"
        f" request_ring_mb = {settings.request_ring_mb} + response_ring_mb = {settings.response_ring_mb} MiB."
        f" Give {directory} more room (Docker/podman: run --shm-size={suggest}m; Kubernetes: mount an emptyDir"
        f" with medium: Memory and sizeLimit: {suggest}Mi at {directory}) or lower request_ring_mb / response_ring_mb"
    )


async def check_store_shm(settings: Settings, store: ModelStore) -> None:
    """`check_shm_room` for the models `store` registers (those preloaded count; a registry that
    cannot be read counts none: its error is reported when the server reads it next).

    Raises:
        ShmShortage: /dev/shm has less free room than the rings need.
    """
    try:
        preloaded = preloaded_models(rec.settings for rec in await store.alist())
    except Exception:
        preloaded = 0
    check_shm_room(settings, preloaded)
