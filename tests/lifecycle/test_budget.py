"""MemoryBudget accounting, PSS reading and keep-alive parsing."""

from __future__ import annotations

import os

import pytest

from modelmora.lifecycle.budget import MemoryBudget, parse_keep_alive, pss_bytes


def test_pss_of_self_and_of_a_missing_process() -> None:
    pss = pss_bytes(os.getpid())
    assert pss is not None and pss > 1_000_000
    assert pss_bytes(2**22 + 12345) is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10m", 600.0),
        ("30s", 30.0),
        ("1h", 3600.0),
        ("250ms", 0.25),
        ("0", 0.0),
        ("-1", None),
        ("45", 45.0),
        (None, None),
        (5, 5.0),
        (-1, None),
        ("1.5m", 90.0),
    ],
)
def test_keep_alive(text: str | int | None, seconds: float | None) -> None:
    assert parse_keep_alive(text) == seconds


def test_keep_alive_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_keep_alive("soon")


def test_reservations_estimates_and_measurements() -> None:
    b = MemoryBudget(1000, admission_factor=1.5, base_mb=100)
    assert b.estimate_mb(200 * 2**20) == 100 + 300
    b.reserve("a", 400)
    b.shared_mb = 50
    assert b.used_mb() == 450 and b.free_mb() == 550
    assert b.fits(550) and not b.fits(551)
    b.measure("a", 250)
    assert b.reserved_mb("a") == 250 and b.used_mb() == 300
    b.measure("missing", 1)  # ignored
    b.release("a")
    assert b.used_mb() == 50 and b.reserved_mb("a") is None
    b.learn_base(180, 100 * 2**20)
    assert b.base_mb == 80
    b.learn_base(5, 100 * 2**20)
    assert b.base_mb == 10


def test_unlimited() -> None:
    b = MemoryBudget(0)
    b.reserve("a", 10**9)
    assert b.unlimited and b.fits(10**9) and b.free_mb() == float("inf")
