"""Per-token request limits, sans-IO: a token bucket for the request rate and a count of running
requests, each token with its own, so that one token's burst never slows another. Time comes from an
injected monotonic clock (tests drive it by hand)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ConcurrencyLimited, RateLimited

__all__ = ("TokenLimits",)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    running: int = 0


@dataclass(slots=True)
class TokenLimits:
    """`rate_per_s` requests a second with bursts of `burst` (0: no rate limit), and `max_running`
    requests at once (0: no cap), per name."""

    rate_per_s: float = 0.0
    burst: int = 0
    max_running: int = 0
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.burst <= 0:
            self.burst = max(1, math.ceil(self.rate_per_s))

    @property
    def active(self) -> bool:
        return self.rate_per_s > 0 or self.max_running > 0

    def acquire(self, name: str) -> None:
        """Count one request of `name` starting now; pair with `release`.

        Raises:
            ConcurrencyLimited: `name` already runs `max_running` requests.
            RateLimited: `name`'s bucket is empty (`retry_after_s`: until it holds one again).
        """
        now = self.clock()
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = _Bucket(float(self.burst), now)
        if self.max_running and bucket.running >= self.max_running:
            raise ConcurrencyLimited(
                f"this token already has {bucket.running} requests running (max_concurrent_requests)",
                retry_after_s=1.0,
            )
        self.charge(name, bucket, now)
        bucket.running += 1

    def charge(self, name: str, bucket: _Bucket | None = None, now: float | None = None) -> None:
        """Count one more request against `name`'s rate (a message of a stream already admitted).

        Raises:
            RateLimited: the bucket is empty.
        """
        if self.rate_per_s <= 0:
            return
        now = self.clock() if now is None else now
        bucket = bucket or self._buckets.setdefault(name, _Bucket(float(self.burst), now))
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate_per_s)
        bucket.updated = now
        if bucket.tokens < 1.0:
            wait_s = (1.0 - bucket.tokens) / self.rate_per_s
            raise RateLimited(
                f"this token is over its rate limit of {self.rate_per_s:g} requests/s; retry in {wait_s:.2f} s",
                retry_after_s=wait_s,
            )
        bucket.tokens -= 1.0

    def release(self, name: str) -> None:
        """A request of `name` ended."""
        bucket = self._buckets.get(name)
        if bucket is not None and bucket.running > 0:
            bucket.running -= 1

    def running(self, name: str) -> int:
        bucket = self._buckets.get(name)
        return bucket.running if bucket is not None else 0
