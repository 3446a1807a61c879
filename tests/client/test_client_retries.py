"""Retries of UNAVAILABLE: a bounded number against a port where nothing listens, until a server
appears on a port that starts listening late, and never for a non-idempotent call once its request
has left (a peer that reads the request and drops the connection). Also what the request carries:
the metadata and the deadline."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import anyio
import anyio.lowlevel
import pytest

from modelmora.client import AsyncClient, DeadlineExceededError, RetryPolicy, UnavailableError

from serverproc import free_port

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)


def retries(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "modelmora.client"]


def no_cancel_left() -> bool:
    """grpclib cancels the waiting task to end a call; the client takes those requests back, so the
    caller's cancel scopes (anyio's, asyncio's task groups) see none left over."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def within_policy(policy: RetryPolicy, records: list[logging.LogRecord]) -> bool:
    """Each logged wait is the policy's capped exponential backoff for its retry, less the jitter."""
    for r in records:
        base = min(policy.max_backoff_s, policy.initial_backoff_s * policy.multiplier ** (r.attempt - 1))
        if not base * (1 - policy.jitter) <= r.delay_s <= base:
            return False
    return True


async def test_nothing_listening_is_retried_a_bounded_number_of_times(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="modelmora.client")
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.02, jitter=0.5)
    async with AsyncClient(f"127.0.0.1:{free_port()}", retry=policy) as client:
        with pytest.raises(UnavailableError) as read:
            await client.models()
        with pytest.raises(UnavailableError) as never_sent:
            await client.generate_image("sd", "a red cube")  # not idempotent, but it never left: retried
    assert (read.value.attempts, never_sent.value.attempts) == (4, 4)
    assert read.value.message.startswith("cannot reach the server: ")
    records = retries(caplog)
    assert [(r.method, r.attempt, r.sent) for r in records] == [
        *[("ListModels", n, False) for n in (1, 2, 3)],
        *[("Infer", n, False) for n in (1, 2, 3)],
    ]
    assert within_policy(policy, records)


@pytest.mark.slow
async def test_retried_until_the_server_starts_listening(
    target: str,
    tcp_peer: Callable[[int, int | None], AbstractAsyncContextManager[object]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="modelmora.client")
    port = free_port()
    policy = RetryPolicy(max_attempts=1000, initial_backoff_s=0.01, max_backoff_s=0.05)
    answered = anyio.Event()
    listed: list[str] = []
    async with AsyncClient(f"127.0.0.1:{port}", retry=policy, timeout=120) as client:

        async def call() -> None:
            listed.extend(m.id for m in await client.models())
            answered.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            with anyio.fail_after(60):  # a safety net, not a performance bound
                while len(retries(caplog)) < 3:  # noqa: ASYNC110 - the log is what there is to watch
                    await anyio.sleep(0.005)
            async with tcp_peer(port, int(target.rsplit(":", 1)[1])):  # the server "starts" on the port
                with anyio.fail_after(60):
                    await answered.wait()
    assert "minilm" in listed
    records = retries(caplog)
    assert len(records) >= 3 and all(r.method == "ListModels" and not r.sent for r in records)
    assert within_policy(policy, records)


async def test_once_sent_only_idempotent_calls_are_retried(tcp_peer, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.WARNING, logger="modelmora.client")
    async with tcp_peer(0, None) as dropping_peer, AsyncClient(f"127.0.0.1:{dropping_peer.port}", retry=FAST) as client:
        with pytest.raises(UnavailableError) as embed:
            await client.embed("minilm", "hello")
        assert dropping_peer.connections == 3  # idempotent: every attempt
        with pytest.raises(UnavailableError) as image:
            await client.generate_image("sd", "a red cube")
        assert dropping_peer.connections == 4  # not idempotent: sent once, not again
        with pytest.raises(UnavailableError) as text_stream:
            async for _ in client.generate_stream("gpt2", "once"):
                pass
        assert dropping_peer.connections == 7  # no event had arrived: retried
        with pytest.raises(UnavailableError) as image_stream:
            async for _ in client.generate_image_stream("sd", "a red cube"):
                pass
        assert dropping_peer.connections == 8
        assert no_cancel_left()
    attempts = [e.value.attempts for e in (embed, image, text_stream, image_stream)]
    assert attempts == [3, 1, 3, 1]
    assert embed.value.message == "the connection was lost: Connection lost"
    assert all(r.sent for r in retries(caplog))
    paths = [r[":path"] for r in dropping_peer.requests]
    assert paths == 3 * ["/modelmora.v1.InferenceService/Infer"] + [
        "/modelmora.v1.InferenceService/Infer",
        *3 * ["/modelmora.v1.InferenceService/Generate"],
        "/modelmora.v1.InferenceService/Generate",
    ]


async def test_the_request_carries_metadata_and_the_deadline(tcp_peer) -> None:  # type: ignore[no-untyped-def]
    no_retry = RetryPolicy(max_attempts=1)
    metadata = {"authorization": "Bearer client-token", "x-team": "search"}
    async with (
        tcp_peer(0, None) as dropping_peer,
        AsyncClient(f"127.0.0.1:{dropping_peer.port}", retry=no_retry, metadata=metadata) as client,
    ):
        with pytest.raises(UnavailableError):
            await client.models(metadata={"x-team": "ads", "x-call": "1"}, timeout=30)
        with pytest.raises(UnavailableError):
            await client.status()
    first, second = dropping_peer.requests
    assert (first["authorization"], first["x-team"], first["x-call"]) == ("Bearer client-token", "ads", "1")
    assert first["grpc-timeout"].endswith(("m", "u", "S")) and "grpc-timeout" not in second
    assert (second["x-team"], "x-call" in second) == ("search", False)


async def test_a_deadline_passing_on_a_silent_server(tcp_peer) -> None:  # type: ignore[no-untyped-def]
    async with tcp_peer(0, None, hold=True) as silent, AsyncClient(f"127.0.0.1:{silent.port}", retry=FAST) as client:
        with pytest.raises(DeadlineExceededError) as err:
            await client.embed("minilm", "hello", timeout=0.2)
        with pytest.raises(DeadlineExceededError):
            async for _ in client.generate_stream("gpt2", "once", timeout=0.2):
                pass
        assert no_cancel_left()
        with anyio.CancelScope():  # the caller's own scopes still work
            await anyio.lowlevel.checkpoint()
    assert (err.value.attempts, err.value.message) == (1, "the call's deadline passed")
    assert silent.connections == 1  # not retried; one connection for both calls
