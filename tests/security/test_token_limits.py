"""Per-token limits, sans-IO with a hand-driven clock: a token bucket (rate and burst) and a cap on
running requests, each token with its own; the refusal says when to retry."""

from __future__ import annotations

import pytest

from modelmora.errors import ConcurrencyLimited, RateLimited
from modelmora.security import TokenLimits


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_then_the_rate_refills_it() -> None:
    clock = Clock()
    limits = TokenLimits(rate_per_s=2.0, burst=3, clock=clock)
    for _ in range(3):
        limits.acquire("a")
        limits.release("a")
    with pytest.raises(RateLimited) as err:
        limits.acquire("a")
    assert err.value.retry_after_s == pytest.approx(0.5)
    assert err.value.message == "this token is over its rate limit of 2 requests/s; retry in 0.50 s"
    assert (err.value.http_status, err.value.code) == (429, "rate_limited")
    limits.acquire("b")  # another token has its own bucket
    clock.now += 0.5
    limits.acquire("a")  # one request's worth came back
    with pytest.raises(RateLimited):
        limits.acquire("a")
    clock.now += 100
    for _ in range(3):  # never more than the burst
        limits.acquire("a")
    with pytest.raises(RateLimited):
        limits.acquire("a")


def test_the_default_burst_is_the_rate_per_second_at_least_one() -> None:
    assert TokenLimits(rate_per_s=0.2).burst == 1
    assert TokenLimits(rate_per_s=7.5).burst == 8
    assert TokenLimits(rate_per_s=2.0, burst=10).burst == 10
    assert not TokenLimits().active


def test_running_requests_are_capped_per_token_and_a_refusal_costs_no_rate() -> None:
    clock = Clock()
    limits = TokenLimits(rate_per_s=1.0, burst=2, max_running=1, clock=clock)
    limits.acquire("a")
    with pytest.raises(ConcurrencyLimited) as err:
        limits.acquire("a")
    assert (err.value.retry_after_s, err.value.code) == (1.0, "too_many_concurrent_requests")
    assert err.value.message == "this token already has 1 requests running (max_concurrent_requests)"
    limits.acquire("b")
    assert (limits.running("a"), limits.running("b")) == (1, 1)
    limits.release("a")
    limits.release("a")  # a second release is harmless
    limits.acquire("a")  # its bucket still holds the second request: the refusal took nothing
    assert limits.running("a") == 1


def test_a_stream_message_is_charged_to_the_rate_only() -> None:
    clock = Clock()
    limits = TokenLimits(rate_per_s=1.0, burst=2, max_running=1, clock=clock)
    limits.acquire("a")
    limits.charge("a")
    with pytest.raises(RateLimited):
        limits.charge("a")
    assert limits.running("a") == 1
    TokenLimits().charge("x")  # no rate limit: nothing to charge
