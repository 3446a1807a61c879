"""`RetryPolicy` alone: capped exponential backoff with jitter, and which failures it retries."""

from __future__ import annotations

import pytest
from grpclib.const import Status
from grpclib.metadata import Deadline

from modelmora.client import NotFoundError, RetryPolicy, UnavailableError


def unavailable(retry_after_s: float | None = None) -> UnavailableError:
    return UnavailableError(Status.UNAVAILABLE, "worker crashed", retry_after_s=retry_after_s)


def test_backoff_grows_by_the_multiplier_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=3.0, jitter=0.5)
    assert [policy.backoff_s(n, lambda: 0.0) for n in range(1, 6)] == pytest.approx([0.1, 0.3, 0.9, 1.0, 1.0])
    assert [policy.backoff_s(n, lambda: 1.0) for n in range(1, 6)] == pytest.approx([0.05, 0.15, 0.45, 0.5, 0.5])
    assert RetryPolicy(jitter=0).backoff_s(2) == pytest.approx(0.2)


def test_only_unavailable_is_retried_and_only_up_to_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3, jitter=0)
    how = {"sent": True, "idempotent": True, "deadline": None}
    assert policy.delay_s(unavailable(), 1, **how) == pytest.approx(0.1)
    assert policy.delay_s(unavailable(), 2, **how) == pytest.approx(0.2)
    assert policy.delay_s(unavailable(), 3, **how) is None  # the third attempt was the last
    assert policy.delay_s(NotFoundError(Status.NOT_FOUND, "no such model"), 1, **how) is None
    assert RetryPolicy(max_attempts=1).delay_s(unavailable(), 1, **how) is None


def test_a_non_idempotent_call_is_retried_only_when_never_sent() -> None:
    policy = RetryPolicy(jitter=0)
    assert policy.delay_s(unavailable(), 1, sent=False, idempotent=False, deadline=None) == pytest.approx(0.1)
    assert policy.delay_s(unavailable(), 1, sent=True, idempotent=False, deadline=None) is None


def test_retry_after_lengthens_the_wait_and_beyond_the_cap_ends_the_retries() -> None:
    policy = RetryPolicy(jitter=0, max_backoff_s=5)
    how = {"sent": True, "idempotent": True, "deadline": None}
    assert policy.delay_s(unavailable(retry_after_s=2), 1, **how) == pytest.approx(2)
    assert policy.delay_s(unavailable(retry_after_s=30), 1, **how) is None


def test_no_retry_that_would_outlast_the_deadline() -> None:
    policy = RetryPolicy(jitter=0, initial_backoff_s=1.0)
    how = {"sent": False, "idempotent": True}
    assert policy.delay_s(unavailable(), 1, deadline=Deadline.from_timeout(0.5), **how) is None
    assert policy.delay_s(unavailable(), 1, deadline=Deadline.from_timeout(3600), **how) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts must be >= 1 (got 0)"),
        ({"initial_backoff_s": 2, "max_backoff_s": 1}, "need 0 <= initial_backoff_s <= max_backoff_s"),
        ({"initial_backoff_s": -1}, "need 0 <= initial_backoff_s <= max_backoff_s"),
        ({"multiplier": 0.5}, "multiplier must be >= 1 (got 0.5)"),
        ({"jitter": 1.5}, "jitter must be within [0, 1] (got 1.5)"),
    ],
)
def test_a_bad_policy_is_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError) as err:
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
    assert str(err.value) == message
