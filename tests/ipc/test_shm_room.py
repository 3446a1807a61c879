"""Segments are backed by memory when created: a /dev/shm without room raises
`SharedMemoryExhausted` (naming /dev/shm, the bytes asked and free) instead of a SIGBUS at the
first write, and leaves nothing behind. The full-/dev/shm cases run in a private mount namespace
with a small tmpfs of their own."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import private_shm
import pytest

from modelmora.ipc import segments
from modelmora.ipc.pool import SegmentPool
from modelmora.ipc.segments import SharedMemoryExhausted, ShmRoom

MiB = 1 << 20


def _backed_bytes(name: str) -> int:
    return os.stat(segments.SHM_DIR / name).st_blocks * 512


def _run_with_small_shm(size: str, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*private_shm.command_or_skip(size), sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_segment_larger_than_the_room_left_raises_instead_of_sigbus() -> None:
    """8 MiB /dev/shm: a 4 MiB segment is written end to end; a 6 MiB one is refused before it
    is mapped, and one whose room vanished after the check is refused by the allocation."""
    proc = _run_with_small_shm(
        "8m",
        """
        import json, os
        from modelmora.ipc import segments

        out = {}
        first = segments.create("test", "a", 4 << 20)
        first.buf[:] = b"x" * (4 << 20)
        try:
            second = segments.create("test", "b", 6 << 20)
            second.buf[:] = b"y" * (6 << 20)  # before the fix: SIGBUS here
        except segments.SharedMemoryExhausted as exc:
            out["checked"] = [str(exc), exc.needed, exc.free]
        real_check = segments.ensure_room
        segments.ensure_room = lambda *args, **kwargs: None  # the room went away after the check
        try:
            third = segments.create("test", "c", 6 << 20)
            third.buf[:] = b"z" * (6 << 20)
        except segments.SharedMemoryExhausted as exc:
            out["allocated"] = [str(exc), exc.needed, exc.free]
        segments.ensure_room = real_check
        out["left"] = sorted(os.listdir("/dev/shm"))
        out["first"] = first.name
        segments.unlink(first)
        print(json.dumps(out))
        """,
    )
    assert proc.returncode != -signal.SIGBUS, "the writer was killed by SIGBUS"
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    message, needed, free = out["checked"]
    assert "/dev/shm" in message and str(6 * MiB) in message and str(free) in message
    assert needed == 6 * MiB and 3 * MiB <= free <= 4 * MiB
    message, needed, free = out["allocated"]
    assert "/dev/shm" in message and str(6 * MiB) in message and str(free) in message
    assert needed == 6 * MiB and 3 * MiB <= free <= 4 * MiB  # the failed allocation gave its pages back
    assert out["left"] == [out["first"]]  # the refused segments were unlinked


def test_a_new_segment_is_backed_by_memory_at_once(instance_id: str) -> None:
    shm = segments.create(instance_id, "t", 2 * MiB + 5)
    try:
        assert _backed_bytes(shm.name) >= 2 * MiB + 5  # ftruncate alone leaves a hole: 0 bytes
    finally:
        segments.unlink(shm)


@pytest.mark.parametrize("how", ["unsupported", "missing"])
def test_without_fallocate_every_page_is_touched(instance_id: str, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    if how == "missing":
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
    else:

        def unsupported(fd: int, offset: int, length: int) -> None:
            raise OSError(errno.EOPNOTSUPP, "not supported")

        monkeypatch.setattr(os, "posix_fallocate", unsupported)
    shm = segments.create(instance_id, "t", 3 * MiB + 100)
    try:
        assert _backed_bytes(shm.name) >= 3 * MiB + 100
        assert shm.buf is not None and bytes(shm.buf[:16]) == bytes(16)
    finally:
        segments.unlink(shm)


def test_another_allocation_error_propagates_and_unlinks(instance_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "posix_fallocate", broken)
    with pytest.raises(OSError, match="I/O error") as info:
        segments.create(instance_id, "t", MiB)
    assert not isinstance(info.value, SharedMemoryExhausted)
    assert segments.our_segments(instance_id) == []


def test_shm_room_reads_the_file_system(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    room = segments.shm_room()
    assert room is not None and 0 <= room.free <= room.total
    st = os.statvfs(segments.SHM_DIR)
    assert room.total == st.f_blocks * st.f_frsize
    monkeypatch.setattr(segments, "SHM_DIR", tmp_path / "missing")
    assert segments.shm_room() is None
    segments.ensure_room(1 << 50)  # nothing to measure: no refusal


def test_ensure_room_counts_whole_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(segments, "shm_room", lambda: ShmRoom(total=10 * page, free=2 * page))
    segments.ensure_room(2 * page)
    with pytest.raises(SharedMemoryExhausted) as info:
        segments.ensure_room(2 * page + 1, "a test segment")
    assert info.value.needed == 3 * page and info.value.free == 2 * page
    assert info.value.errno == errno.ENOSPC
    assert f"needs {3 * page / MiB:.1f} MiB ({3 * page} bytes)" in str(info.value)
    assert "a test segment" in str(info.value)


# -- the pool gives idle segments back --------------------------------------------------------


def test_the_pool_keeps_a_small_warm_set_and_unlinks_the_rest(instance_id: str) -> None:
    with SegmentPool(instance_id, "w", keep_idle_segments=2, keep_idle_bytes=8 * MiB) as pool:
        names = [pool.acquire(2 * MiB)[0] for _ in range(4)]
        assert len(segments.our_segments(instance_id)) == 4
        for name in names:
            pool.release(name)
        # the two released last stay warm; the older ones are gone from /dev/shm
        assert segments.our_segments(instance_id) == sorted(names[2:])
        stats = pool.statistics()
        assert (stats.segments, stats.in_use, stats.trimmed) == (2, 0, 2)
        pool.release(names[0])  # a segment the pool already unlinked: nothing to do
        again, _ = pool.acquire(2 * MiB)
        assert again in names[2:]  # reused warm
        big, _ = pool.acquire(9 * MiB)
        pool.release(big)  # over keep_idle_bytes on its own: unlinked at once
        assert big not in segments.our_segments(instance_id)
        assert pool.statistics().trimmed == 3
        mid, _ = pool.acquire(6 * MiB)
        pool.release(again)
        pool.release(mid)  # 3 idle (2 + 2 + 6 MiB): the oldest goes
        assert segments.our_segments(instance_id) == sorted([again, mid])
        small, _ = pool.acquire(MiB)
        assert small == again  # a warm segment serves a payload down to half its size
        pool.release(small)
        assert pool.statistics().trimmed == 4
        with pytest.raises(KeyError):
            pool.release("mm-not-ours")


def test_the_pool_frees_its_warm_set_when_shm_has_no_room(instance_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 10 MiB of (simulated) room, idle segments are given back to make room for a new one."""
    pool = SegmentPool(instance_id, "w", keep_idle_segments=4, keep_idle_bytes=64 * MiB)
    monkeypatch.setattr(
        segments, "shm_room", lambda: ShmRoom(total=10 * MiB, free=10 * MiB - pool.statistics().total_bytes)
    )
    try:
        a, _ = pool.acquire(4 * MiB)
        pool.release(a)
        b, view = pool.acquire(8 * MiB)  # 6 MiB free while a is warm: a is unlinked, then b fits
        assert len(view) == 8 * MiB and segments.our_segments(instance_id) == [b]
        with pytest.raises(SharedMemoryExhausted, match="/dev/shm"):
            pool.acquire(4 * MiB)  # nothing idle to give back
        assert segments.our_segments(instance_id) == [b]
        pool.release(b)
        c, _ = pool.acquire(5 * MiB)
        assert c == b  # 8 MiB serves a 5 MiB class (at most twice its size)
    finally:
        pool.close()
