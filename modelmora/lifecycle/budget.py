"""The workers' memory budget: estimates, reservations, measured PSS, keep-alive parsing.

Memory is accounted as PSS (proportional set size, `/proc/PID/smaps_rollup`): workers
forked from one zygote share pages, and summed RSS would count those pages once per
worker. A model version not yet measured is estimated as the measured (or configured)
cost of an empty worker plus its weights size times the admission factor; once its worker
runs, the estimate is replaced by the worker's measured PSS.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ("MemoryBudget", "Reservation", "parse_keep_alive", "process_memory", "pss_bytes", "smaps_rollup")

_MB = 2**20
_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def smaps_rollup(pid: int) -> dict[str, int]:
    """RSS and PSS of process `pid` in bytes (keys "rss", "pss") from `/proc/PID/smaps_rollup`;
    empty when it is gone or unreadable (any `OSError`, out of file descriptors included: a
    memory figure is never worth an exception in a periodic task).

    Reading it walks every mapping of the process (~16 ms for a 900 MB worker): call it off
    the event loop where that matters.
    """
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                key, _, rest = line.partition(b":")
                if key in (b"Rss", b"Pss"):
                    out[key.decode().lower()] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def pss_bytes(pid: int) -> int | None:
    """The PSS of process `pid` in bytes; None when it is gone or unreadable."""
    return smaps_rollup(pid).get("pss")


def process_memory(pid: int) -> dict[str, float] | None:
    """RSS and PSS of `pid` in MiB (`rss_mb`, `pss_mb`); None when unreadable."""
    memory = smaps_rollup(pid)
    return {f"{k}_mb": round(v / _MB, 1) for k, v in memory.items()} if memory else None


def parse_keep_alive(value: str | float | int | None) -> float | None:
    """A keep-alive duration in seconds: "10m", "30s", "1h", "250ms", a number of seconds;
    "0" unloads right after use; "-1" (any negative) or None means never.

    Raises:
        ValueError: not a duration.
    """
    if value is None:
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(value)
        if m is None:
            raise ValueError(f"keep_alive {value!r} is not a duration like '10m', '30s', '0' or '-1'")
        seconds = float(m[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m[2]]
    return None if seconds < 0 else seconds


@dataclass(slots=True)
class Reservation:
    """Memory set aside for one model version's worker."""

    estimate_mb: float
    measured_mb: float | None = None

    @property
    def mb(self) -> float:
        return self.estimate_mb if self.measured_mb is None else self.measured_mb


class MemoryBudget:
    """Admission control for worker memory.

    Args:
        budget_mb: total MiB for workers and the zygote; 0 means unlimited.
        admission_factor: weights are multiplied by this in estimates (activations, buffers).
        base_mb: cost of an empty worker until one is measured.
    """

    def __init__(self, budget_mb: float, admission_factor: float = 1.5, base_mb: float = 400.0) -> None:
        self.budget_mb = budget_mb
        self.admission_factor = admission_factor
        self.base_mb = base_mb
        self.shared_mb = 0.0
        """Memory of processes every worker relies on (the zygote), counted in `used_mb`."""
        self._reservations: dict[Hashable, Reservation] = {}

    @property
    def unlimited(self) -> bool:
        return self.budget_mb <= 0

    def estimate_mb(self, weights_bytes: int) -> float:
        """Estimated footprint of a worker serving weights of that size."""
        return self.base_mb + weights_bytes / _MB * self.admission_factor

    def used_mb(self) -> float:
        return self.shared_mb + sum(r.mb for r in self._reservations.values())

    def free_mb(self) -> float:
        return float("inf") if self.unlimited else self.budget_mb - self.used_mb()

    def fits(self, need_mb: float) -> bool:
        return self.unlimited or self.used_mb() + need_mb <= self.budget_mb

    def reserve(self, key: Hashable, estimate_mb: float) -> None:
        self._reservations[key] = Reservation(estimate_mb)

    def measure(self, key: Hashable, measured_mb: float) -> None:
        """Replace the estimate of `key` by its worker's measured PSS."""
        res = self._reservations.get(key)
        if res is not None:
            res.measured_mb = measured_mb

    def release(self, key: Hashable) -> None:
        self._reservations.pop(key, None)

    def reserved_mb(self, key: Hashable) -> float | None:
        res = self._reservations.get(key)
        return None if res is None else res.mb

    def learn_base(self, worker_pss_mb: float, weights_bytes: int) -> None:
        """Refine the empty-worker cost from a measured worker (never below 10 MiB)."""
        self.base_mb = max(10.0, worker_pss_mb - weights_bytes / _MB)
