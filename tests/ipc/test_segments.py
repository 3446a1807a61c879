"""Segments: creation, attachment, stale clean-up, the supervisor's pool and the worker's cache."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelmora.ipc import segments
from modelmora.ipc.pool import MIN_POOL_SEGMENT_BYTES, AttachedSegments, SegmentPool, pool_size_class

MiB = 1 << 20


def test_create_attach_unlink(instance_id: str) -> None:
    shm = segments.create(instance_id, "t", 4096)
    assert shm.name.startswith(f"mm-{instance_id}-t-")
    assert segments.our_segments(instance_id) == [shm.name]
    shm.buf[:5] = b"hello"
    peer = segments.attach(shm.name)
    assert bytes(peer.buf[:5]) == b"hello"
    peer.buf[5:7] = b"!!"
    assert bytes(shm.buf[:7]) == b"hello!!"
    peer.close()
    segments.unlink(shm)
    segments.unlink(shm)  # gone already: no error
    assert segments.our_segments(instance_id) == []
    with pytest.raises(FileNotFoundError):
        segments.attach(shm.name)


def test_unlink_with_a_live_view_still_removes_the_name(instance_id: str) -> None:
    shm = segments.create(instance_id, "t", 4096)
    view = shm.buf[:10]
    segments.unlink(shm)
    assert segments.our_segments(instance_id) == []
    view.release()
    shm.close()


def test_attach_leaves_the_owners_resource_tracker_alone(tmp_path: Path) -> None:
    """A spawned worker shares the supervisor's tracker: attaching must not unregister."""
    script = tmp_path / "owner.py"
    script.write_text(
        textwrap.dedent(
            """
            import multiprocessing as mp
            from modelmora.ipc import segments

            def child(name):
                segments.attach(name).close()

            if __name__ == "__main__":
                shm = segments.create(segments.new_instance_id(), "tracker", 4096)
                p = mp.get_context("spawn").Process(target=child, args=(shm.name,))
                p.start()
                p.join()
                segments.unlink(shm)
                assert p.exitcode == 0, p.exitcode
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "KeyError" not in done.stderr
    assert "leaked" not in done.stderr


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_remove_stale_removes_only_dead_servers_segments(instance_id: str) -> None:
    dead = f"{_dead_pid()}-abcdef"
    stale = shared_memory.SharedMemory(f"mm-{dead}-ring-000000", create=True, size=4096)
    resource_tracker.unregister(stale._name, "shared_memory")  # type: ignore[attr-defined]
    stale.close()
    ours = segments.create(instance_id, "ring", 4096)
    try:
        removed = segments.remove_stale()
        # Another test session may run remove_stale at the same time and win the race for
        # `stale`: check the outcome, not who removed it.
        assert segments.our_segments(dead) == []
        assert segments.our_segments(instance_id) == [ours.name]
        assert ours.name not in removed
        assert all(not segments._alive(int(name.split("-")[1])) for name in removed)
    finally:
        segments.unlink(ours)
        (segments.SHM_DIR / stale.name).unlink(missing_ok=True)


@given(nbytes=st.integers(0, 1 << 34))
def test_pool_size_class(nbytes: int) -> None:
    size = pool_size_class(nbytes)
    assert size >= max(nbytes, MIN_POOL_SEGMENT_BYTES)
    assert size == MIN_POOL_SEGMENT_BYTES or 4 * size < 5 * nbytes  # segments are fully backed: < 25% waste
    assert size % 4096 == 0  # whole pages
    assert pool_size_class(size) == size  # a class is its own class


def test_pool_reuses_segments_by_size_class(instance_id: str) -> None:
    with SegmentPool(instance_id, "w1") as pool:
        a, view_a = pool.acquire(3 * MiB)
        assert len(view_a) == 3 * MiB and not view_a.readonly
        view_a[:3] = b"abc"
        b, _ = pool.acquire(10)  # a is in use: a second segment (1 MiB class)
        assert b != a
        assert pool.statistics().in_use == 2
        assert bytes(pool.view(a, 3)) == b"abc"
        pool.release(a)
        with pytest.raises(ValueError, match="released"):
            view_a[0]  # the views handed out die with the release
        pool.release(a)  # idempotent
        c, view_c = pool.acquire(3 * MiB - 100)  # same class as 3 MiB: a again, warm
        assert c == a and len(view_c) == 3 * MiB - 100
        d, _ = pool.acquire(3 * MiB + 1)  # next class (3.5 MiB)
        assert d not in (a, b)
        stats = pool.statistics()
        assert (stats.segments, stats.in_use, stats.created, stats.reused) == (3, 3, 3, 1)
        assert stats.total_bytes == stats.in_use_bytes == 3 * MiB + MiB + 7 * MiB // 2
        assert sorted(pool.names()) == segments.our_segments(instance_id)
        with pytest.raises(ValueError):
            pool.view(b, 2 * MiB)  # larger than the segment
        with pytest.raises(KeyError):
            pool.release("mm-nope")
    assert segments.our_segments(instance_id) == []
    pool.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        pool.acquire(1)


def test_pool_close_unlinks_despite_exported_views(instance_id: str) -> None:
    pool = SegmentPool(instance_id, "w2")
    _, view = pool.acquire(2 * MiB)
    array = np.frombuffer(view, dtype=np.uint64)  # an export the pool cannot release
    array[:] = 7
    pool.close()
    assert segments.our_segments(instance_id) == []
    assert int(array[-1]) == 7  # still mapped until the array dies
    del array
    gc.collect()  # and the segment objects' finalizers do not complain


def test_attached_segments_cache(instance_id: str) -> None:
    pool = SegmentPool(instance_id, "w3")
    cache = AttachedSegments()
    try:
        name, view = pool.acquire(MiB)
        view[:4] = b"ping"
        buf = cache.get(name)
        assert cache.get(name) is buf and len(cache) == 1 and name in cache
        assert bytes(buf[:4]) == b"ping"
        buf[4:8] = b"pong"
        assert bytes(pool.view(name, 8)) == b"pingpong"
        held = buf[:8]  # a view the worker forgot to drop
        cache.close()
        assert len(cache) == 0
        assert bytes(held[:4]) == b"ping"  # still mapped while it lives
        held.release()
        cache.close()
        assert segments.our_segments(instance_id) == [name]  # closing never unlinks
        with pytest.raises(FileNotFoundError):
            cache.get(f"mm-{instance_id}-missing")
        cache.get(name)
        cache.discard(name)
        cache.discard(name)
        assert len(cache) == 0
    finally:
        cache.close()
        pool.close()


def test_a_pool_never_closed_warns(instance_id: str) -> None:
    pool = SegmentPool(instance_id, "w4")
    pool.acquire(1)
    with pytest.warns(ResourceWarning, match="never closed"):
        pool.__del__()
    assert segments.our_segments(instance_id) == []


def test_ipc_imports_only_stdlib_and_msgspec() -> None:
    code = (
        "import sys, modelmora.ipc; print(sorted(m for m in ('numpy', 'anyio', 'torch', 'trio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
