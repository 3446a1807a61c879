"""Run a command with a small /dev/shm of its own: a private mount namespace (`unshare`) with a
fresh tmpfs mounted on /dev/shm, so that tests can fill it without touching the machine's."""

from __future__ import annotations

import functools
import shutil
import subprocess

import pytest


@functools.cache
def available() -> bool:
    """Whether this process may create a mount namespace and mount a tmpfs in it (root, usually)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*command("1m"), "true"], capture_output=True, text=True, timeout=30, check=False)
    return probe.returncode == 0


def command(size: str) -> list[str]:
    """The prefix that runs the command after it with a `size` tmpfs (e.g. "16m") on /dev/shm."""
    script = f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]


def command_or_skip(size: str) -> list[str]:
    """`command(size)`, or skip the test where a private /dev/shm cannot be made."""
    if not available():
        pytest.skip("needs unshare and mount to give the test a /dev/shm of its own")
    return command(size)
