"""Fixtures for the IPC tests: every test gets its own instance id, and leaves no segment."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from modelmora.ipc import segments


@pytest.fixture(autouse=True)
def instance_id() -> Iterator[str]:
    """A fresh server instance id; after the test, no segment of it may remain in /dev/shm."""
    iid = segments.new_instance_id()
    yield iid
    leftover = segments.our_segments(iid)
    for name in leftover:  # clean up before failing, so one failure does not leak
        (segments.SHM_DIR / name).unlink(missing_ok=True)
    assert leftover == [], f"segments left behind: {leftover}"
