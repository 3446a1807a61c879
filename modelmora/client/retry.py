"""When a failed call is tried again: UNAVAILABLE only, with capped exponential backoff, within the
call's deadline, and never a non-idempotent call once its request may have reached the server.

Which calls are idempotent (running one twice leaves the server as running it once):

| call | idempotent | retried on UNAVAILABLE |
|---|---|---|
| `embed`, `generate`, `caption` | yes: inference keeps no state | always |
| `generate_stream` | yes, until its first event arrives | before the first event |
| `generate_image`, `generate_image_stream` | no: each run stores a new result (and costs a full
  denoising) | only when the request was never sent (no connection) |
| `infer_stream` | its requests may have run | not retried |
| `models`, `model`, `status` | yes: reads | always |
| `update_settings` | yes: it replaces the settings with the same ones | always |
| `delete_model` | no: a second run answers NOT_FOUND | only when the request was never sent |
| `load`, `unload` | yes: they set a state | always |
| `submit` | yes: it sends an idempotency key, so a retry answers the same job | always |
| `job`, `wait`, `job_result`, `cancel` | yes: reads, and a cancel sets a state | always |
| `watch` | a stream of reads | not retried |

"Never sent" means the connection could not be made (refused, unreachable, name not resolved):
the server cannot have seen the request. Once the request's headers left, a lost connection or an
UNAVAILABLE answer may come after the server started the work, so only idempotent calls go again.
Other statuses are not retried (RESOURCE_EXHAUSTED carries the server's `retry_after_s` for the
caller to decide).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from grpclib.metadata import Deadline

from .errors import ClientError, UnavailableError

__all__ = ("RetryPolicy",)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How UNAVAILABLE is retried.

    Args:
        max_attempts: attempts in all, the first included (1: never retry).
        initial_backoff_s: the wait before the first retry.
        max_backoff_s: the cap on any wait; a server's `retry-after` longer than this ends the
            retries (the error carries `retry_after_s`).
        multiplier: each wait is this times the previous one, up to the cap.
        jitter: each wait is shortened by a random fraction up to this (0: exact waits), so that
            many clients refused at once do not come back at once.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 (got {self.max_attempts})")
        if not 0 <= self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("need 0 <= initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1 (got {self.multiplier})")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within [0, 1] (got {self.jitter})")

    def backoff_s(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """The wait before retry number `retry` (1: the first retry)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** max(0, retry - 1))
        return base * (1 - self.jitter * rand())

    def delay_s(
        self, error: ClientError, attempt: int, *, sent: bool, idempotent: bool, deadline: Deadline | None
    ) -> float | None:
        """The wait before trying again after `attempt` failed with `error`, or None: do not."""
        if not isinstance(error, UnavailableError) or attempt >= self.max_attempts:
            return None
        if sent and not idempotent:
            return None
        delay = self.backoff_s(attempt)
        if error.retry_after_s is not None:
            if error.retry_after_s > self.max_backoff_s:
                return None
            delay = max(delay, error.retry_after_s)
        if deadline is not None and deadline.time_remaining() <= delay:
            return None
        return delay
