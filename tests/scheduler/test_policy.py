"""Scheduler policy without processes: a real `Scheduler` over fake workers (tests/scheduler/fakes.py).

Where time matters the tests run on trio with `MockClock(autojump_threshold=0)`: whenever every
task waits, the clock jumps to the next deadline, so "after 60 s" takes no time and every time
asserted is exact. The scheduler reads all its time from `anyio.current_time()`, which is that
clock. Tests assert states, recorded batches and clock times, never how long they took.

The thin layer of real-process tests on top: tests/api/test_lifecycle.py, test_scheduling.py.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from fakes import FakeBatch, FakeWorkers
from trio.testing import MockClock

from modelmora.broadcast import Broadcast
from modelmora.config import Settings
from modelmora.errors import InsufficientMemory, ModelLoadFailed, ModelMoraError, WorkerCrashed
from modelmora.lifecycle import TRANSITIONS, IllegalTransition, ModelState, check_transition
from modelmora.registry import ModelRecord, VersionRecord
from modelmora.scheduler import ModelKey, ModelRuntime, Priority, Request, Scheduler, StopReason

from conftest import make_settings

pytestmark = pytest.mark.anyio

MB = 2**20
S = ModelState
MOCK_CLOCK = "trio+mockclock"
on_mock_clock = pytest.mark.parametrize("anyio_backend", [MOCK_CLOCK], indirect=True)
"""Run a test on trio with a fresh `MockClock(autojump_threshold=0)`."""


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str | tuple[str, dict[str, Any]]:
    if request.param == MOCK_CLOCK:  # a fresh clock for every test
        return ("trio", {"clock": MockClock(autojump_threshold=0)})
    return str(request.param)


@pytest.fixture(autouse=True)
def _proc_reads_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Admission reads /proc in a worker thread; while a thread runs every task waits, and the
    mock clock would jump past deadlines in the middle of a worker start. The fakes' pids do
    not exist (PSS None), so the read is instant: do it on the event loop."""

    async def run_sync(func: Callable[..., Any], *args: Any, **_: Any) -> Any:
        await anyio.lowlevel.checkpoint()
        return func(*args)

    monkeypatch.setattr(anyio.to_thread, "run_sync", run_sync)


# -- the harness ------------------------------------------------------------------------------


@dataclass
class Policy:
    """A running scheduler whose workers are fakes."""

    scheduler: Scheduler
    workers: FakeWorkers
    settings: Settings

    def record(self, model_id: str, *, weights_mb: float = 0, **settings: Any) -> ModelRecord:
        version = VersionRecord("1.0.0", f"models/{model_id}/1.0.0", size_bytes=int(weights_mb * MB))
        return ModelRecord(model_id, "txt2embed", "test", "1.0.0", [version], settings=settings)

    def runtime(self, model_id: str, *, weights_mb: float = 0, **settings: Any) -> ModelRuntime:
        """The runtime of `model_id` as a registry entry with these settings describes it."""
        return self.scheduler.runtime_for(self.record(model_id, weights_mb=weights_mb, **settings))

    def submit(
        self,
        rt: ModelRuntime,
        *texts: str,
        priority: Priority = Priority.NORMAL,
        deadline: float | None = None,
        **params: Any,
    ) -> Request:
        when = anyio.current_time() + 1000 if deadline is None else deadline
        req = Request(rt.key, {"text": list(texts)}, params, priority, when)
        self.scheduler.submit(rt, req)
        return req


@asynccontextmanager
async def running(tmp_path: Path, **overrides: Any) -> AsyncIterator[Policy]:
    settings = make_settings(
        tmp_path / "home", **{"memory_budget_mb": -1, "memory_poll_ms": 60_000, "keep_alive": "-1", **overrides}
    )
    workers = FakeWorkers()
    scheduler = Scheduler(settings, "policy", open_worker=workers.open)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        yield Policy(scheduler, workers, settings)
        scheduler.close()


async def wait_for(check: Callable[[], bool], signal: Broadcast, *, within_s: float = 24 * 3600) -> None:
    """Wait (letting the mock clock run to the next deadline) until `check()` holds; `signal` is
    notified whenever it may have changed. `within_s` of clock time (a day on the mock clock,
    which costs nothing) turns a regression into a failure instead of a hung test."""
    with anyio.fail_after(within_s):
        while not check():
            await signal.wait()


async def settle(check: Callable[[], bool]) -> None:
    """Let the other tasks run, without the clock moving, until `check()` holds."""
    for _ in range(10_000):
        if check():
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError("condition not reached")


async def let_run() -> None:
    """Let the other tasks run a while (the clock does not move)."""
    for _ in range(100):
        await anyio.lowlevel.checkpoint()


async def result_of(req: Request) -> Any:
    await req.done.wait()
    if req.error is not None:
        raise req.error
    return req.result


async def error_of(req: Request) -> ModelMoraError:
    await req.done.wait()
    assert req.error is not None, f"expected an error, got {req.result!r}"
    return req.error


def states(rt: ModelRuntime) -> list[str]:
    return [state for _, state, _ in rt.history]


def start_gaps(p: Policy) -> list[float]:
    """Clock time between successive worker starts (failed ones included)."""
    return [round(b - a, 6) for (_, a), (_, b) in itertools.pairwise(p.workers.load_attempts)]


def texts(batches: list[FakeBatch]) -> list[list[str]]:
    return [b.texts for b in batches]


# -- states -----------------------------------------------------------------------------------


def test_check_transition_allows_the_table_and_refuses_the_rest() -> None:
    for old in ModelState:
        check_transition(old, old)  # staying put is always allowed
        for new in ModelState:
            if new in TRANSITIONS[old]:
                check_transition(old, new)
            elif new != old:
                with pytest.raises(IllegalTransition, match=f"from {old} to {new}"):
                    check_transition(old, new)
    assert S.LOADING not in TRANSITIONS[S.READY]  # a loaded worker never loads again
    assert S.READY not in TRANSITIONS[S.CACHED]  # ready only through loading


async def test_a_runtime_refuses_an_illegal_transition(tmp_path: Path) -> None:
    async with running(tmp_path) as p:
        rt = p.runtime("m")
        assert rt.state == S.CACHED
        with pytest.raises(IllegalTransition):
            rt.set_state(S.READY)
        assert rt.state == S.CACHED and rt.history == []  # nothing changed
        rt.set_state(S.LOADING, "test")
        with pytest.raises(IllegalTransition):
            rt.set_state(S.DOWNLOADING)
        assert rt.state == S.LOADING


async def test_a_worker_goes_through_the_lifecycle_states(tmp_path: Path) -> None:
    async with running(tmp_path) as p:
        p.workers.auto_answer = True
        rt = p.runtime("m")
        assert await result_of(p.submit(rt, "x")) == {"echo": ["x"]}
        await p.scheduler.unload(rt, 5)
        assert states(rt) == ["loading", "warming", "ready", "unloading", "cached"]
        assert rt.loads == 1 and rt.served == 1 and rt.batches == 1
        assert p.workers.workers[0].dead and not p.workers.workers[0].crashed


# -- priorities and ageing ----------------------------------------------------------------------


@on_mock_clock
@pytest.mark.parametrize(
    ("waited_s", "order"),
    [
        (0.9, ["critical", "high", "normal", "low"]),  # still LOW
        (1.1, ["critical", "high", "low", "normal"]),  # one class up: NORMAL, older than the new one
        (2.1, ["critical", "low", "high", "normal"]),  # HIGH
        (3.1, ["low", "critical", "high", "normal"]),  # CRITICAL, the top
    ],
)
async def test_a_waiting_low_request_moves_up_a_class_every_aging_interval(
    tmp_path: Path, waited_s: float, order: list[str]
) -> None:
    async with running(tmp_path, max_batch_size=1, priority_aging_ms=1000) as p:
        rt = p.runtime("m")
        p.submit(rt, "busy")
        busy = await p.workers.next_batch()
        deadline = anyio.current_time() + 100  # one deadline for all: only the class and arrival decide
        low = p.submit(rt, "low", priority=Priority.LOW, deadline=deadline)
        await anyio.sleep(waited_s)
        fresh = [
            p.submit(rt, name, priority=prio, deadline=deadline)
            for name, prio in (("normal", Priority.NORMAL), ("high", Priority.HIGH), ("critical", Priority.CRITICAL))
        ]
        p.workers.auto_answer = True
        busy.answer()
        for req in (low, *fresh):
            await result_of(req)
        assert texts(p.workers.batches[1:]) == [[name] for name in order]


@on_mock_clock
async def test_without_ageing_low_waits_for_every_later_request(tmp_path: Path) -> None:
    async with running(tmp_path, max_batch_size=1, priority_aging_ms=0) as p:
        rt = p.runtime("m")
        p.submit(rt, "busy")
        busy = await p.workers.next_batch()
        low = p.submit(rt, "low", priority=Priority.LOW)
        await anyio.sleep(600)
        normal = p.submit(rt, "normal")
        p.workers.auto_answer = True
        busy.answer()
        await result_of(low)
        await result_of(normal)
        assert texts(p.workers.batches[1:]) == [["normal"], ["low"]]


@on_mock_clock
async def test_critical_overtakes_queued_low_requests(tmp_path: Path) -> None:
    async with running(tmp_path, max_batch_size=1) as p:
        rt = p.runtime("m")
        p.submit(rt, "busy")
        busy = await p.workers.next_batch()
        lows = [p.submit(rt, f"low{i}", priority=Priority.LOW) for i in range(20)]
        critical = p.submit(rt, "critical", priority=Priority.CRITICAL)
        p.workers.auto_answer = True
        busy.answer()
        await result_of(critical)
        for req in lows:
            await result_of(req)
        assert texts(p.workers.batches[1:]) == [["critical"]] + [[f"low{i}"] for i in range(20)]


@on_mock_clock
async def test_arrivals_while_busy_form_the_next_batch(tmp_path: Path) -> None:
    async with running(tmp_path, max_batch_size=4) as p:
        rt = p.runtime("m")
        p.submit(rt, "first")
        first = await p.workers.next_batch()
        later = [p.submit(rt, f"r{i}") for i in range(6)]
        await anyio.sleep(1)
        assert len(p.workers.batches) == 1  # the worker is busy: they wait
        p.workers.auto_answer = True
        first.answer()
        for req in later:
            await result_of(req)
        assert texts(p.workers.batches[1:]) == [["r0", "r1", "r2", "r3"], ["r4", "r5"]]
        assert all(b.params["batch_size"] == 4 for b in p.workers.batches)


@on_mock_clock
async def test_a_second_stream_takes_only_a_full_batch(tmp_path: Path) -> None:
    async with running(tmp_path, max_batch_size=2) as p:
        p.workers.streams = 2
        rt = p.runtime("m")
        p.submit(rt, "first")
        first = await p.workers.next_batch()
        p.submit(rt, "a")
        await anyio.sleep(1)
        assert len(p.workers.batches) == 1  # one item waits: the busy worker's next batch, not a stream of its own
        p.submit(rt, "b")
        await wait_for(lambda: len(p.workers.batches) == 2, p.workers.changed)
        second = p.workers.batches[1]
        assert second.texts == ["a", "b"] and first.running
        assert second.started_at == pytest.approx(first.started_at + 1)


# -- max_wait_ms ---------------------------------------------------------------------------------


@on_mock_clock
@pytest.mark.parametrize(
    ("max_wait_ms", "second", "sent_after_s", "batch"),
    [
        (200, ["b"], 0.2, ["a", "b"]),  # waits max_wait_ms for a fuller batch, then goes with what is there
        (200, ["b", "c", "d"], 0.05, ["a", "b", "c", "d"]),  # a full batch goes at once
        (200, ["critical"], 0.05, ["critical", "a"]),  # a CRITICAL request goes at once
        (0, ["b"], 0.0, ["a"]),  # the default: an idle worker takes what is queued at once
    ],
)
async def test_an_idle_worker_waits_max_wait_ms_for_a_fuller_batch(
    tmp_path: Path, max_wait_ms: float, second: list[str], sent_after_s: float, batch: list[str]
) -> None:
    async with running(tmp_path, max_batch_size=4, max_wait_ms=max_wait_ms) as p:
        rt = p.runtime("m")
        await p.scheduler.load(rt, 30)
        t0 = anyio.current_time()
        p.submit(rt, "a")
        await anyio.sleep(0.05)
        prio = Priority.CRITICAL if second == ["critical"] else Priority.NORMAL
        p.submit(rt, *second, priority=prio)
        first = await p.workers.next_batch()
        assert first.texts == batch
        assert first.started_at == pytest.approx(t0 + sent_after_s)


@on_mock_clock
async def test_per_model_max_wait_ms_overrides_the_server_default(tmp_path: Path) -> None:
    async with running(tmp_path, max_batch_size=4, max_wait_ms=1000) as p:
        rt = p.runtime("m", max_wait_ms=300)
        await p.scheduler.load(rt, 30)
        t0 = anyio.current_time()
        p.submit(rt, "a")
        batch = await p.workers.next_batch()
        assert batch.started_at == pytest.approx(t0 + 0.3)


# -- keep_alive -------------------------------------------------------------------------------------


@on_mock_clock
async def test_an_idle_worker_stops_keep_alive_after_its_last_use(tmp_path: Path) -> None:
    async with running(tmp_path, keep_alive="60s") as p:
        rt = p.runtime("m")
        req = p.submit(rt, "x")
        batch = await p.workers.next_batch()
        await anyio.sleep(5)  # a long batch: idle time counts from its end
        batch.answer()
        await result_of(req)
        used = anyio.current_time()
        await anyio.sleep(59)
        worker = p.workers.workers[0]
        assert not worker.dead and rt.state == S.READY
        p.workers.auto_answer = True
        await result_of(p.submit(rt, "again"))  # a use: another 60 s from now
        used = anyio.current_time()
        await wait_for(lambda: worker.stopped_at is not None, p.workers.changed)
        assert worker.stopped_at == pytest.approx(used + 60)
        await wait_for(lambda: rt.state == S.CACHED, rt.changed)
        assert rt.history[-2][1:] == ("unloading", "idle")
        assert len(p.workers.workers) == 1
        await result_of(p.submit(rt, "back"))  # a request brings it back
        assert len(p.workers.workers) == 2


@on_mock_clock
async def test_keep_alive_counts_from_the_load_when_nothing_ran(tmp_path: Path) -> None:
    async with running(tmp_path, keep_alive="10s") as p:
        rt = p.runtime("m")
        await p.scheduler.load(rt, 30)
        ready = anyio.current_time()
        worker = p.workers.workers[0]
        await wait_for(lambda: worker.stopped_at is not None, p.workers.changed)
        assert worker.stopped_at == pytest.approx(ready + 10)


@on_mock_clock
@pytest.mark.parametrize(
    ("keep_alive", "stops_after_s"),
    [("30s", 30.0), ("5s", 10.0), ("0", 10.0)],  # from the last use; at once if that is already past
)
async def test_a_keep_alive_change_reaches_an_idle_worker(
    tmp_path: Path, keep_alive: str, stops_after_s: float
) -> None:
    async with running(tmp_path, keep_alive="10m") as p:
        p.workers.auto_answer = True
        rt = p.runtime("m")
        await result_of(p.submit(rt, "x"))
        used = anyio.current_time()
        await anyio.sleep(10)
        assert p.runtime("m", keep_alive=keep_alive) is rt  # the registry entry changed
        worker = p.workers.workers[0]
        await wait_for(lambda: worker.stopped_at is not None, p.workers.changed)
        assert worker.stopped_at == pytest.approx(used + stops_after_s)


@on_mock_clock
async def test_keep_alive_minus_one_keeps_an_idle_worker(tmp_path: Path) -> None:
    async with running(tmp_path, keep_alive="1s") as p:
        p.workers.auto_answer = True
        rt = p.runtime("m", keep_alive="-1")
        await result_of(p.submit(rt, "x"))
        await anyio.sleep(7 * 24 * 3600)
        assert rt.state == S.READY and not p.workers.workers[0].dead


@on_mock_clock
async def test_a_device_change_replaces_the_worker_once_its_batch_finishes(tmp_path: Path) -> None:
    async with running(tmp_path) as p:
        rt = p.runtime("m", device="cpu")
        req = p.submit(rt, "x")
        batch = await p.workers.next_batch()
        assert p.runtime("m", device="cuda:1", dtype="float16") is rt
        await anyio.sleep(10)
        old = p.workers.workers[0]
        assert not old.dead and batch.running and not batch.cancelled  # the running batch finishes first
        batch.answer()
        assert await result_of(req) == {"echo": ["x"]}
        await wait_for(lambda: old.dead, p.workers.changed)
        assert rt.history[-2][1:] == ("unloading", "replace")
        p.workers.auto_answer = True
        await result_of(p.submit(rt, "y"))
        new = p.workers.workers[1].spec
        assert (new.device, new.dtype) == ("cuda:1", "float16") and old.spec.device == "cpu"


# -- crashes ------------------------------------------------------------------------------------------


@on_mock_clock
async def test_a_worker_that_keeps_crashing_restarts_with_backoff(tmp_path: Path) -> None:
    async with running(tmp_path, max_batch_size=1, load_retry_base_s=1, load_retry_cap_s=4) as p:
        p.workers.crash_on_infer.add("m")
        rt = p.runtime("m")
        reqs = [p.submit(rt, f"r{i}") for i in range(7)]
        for req in reqs:  # each worker takes one request down with it; the others wait for the next
            err = await error_of(req)
            assert isinstance(err, WorkerCrashed) and err.http_status == 503 and err.retry_after_s == 1.0
        # the first restart is immediate; from the 2nd crash in a row: base * 2**(n-2), capped
        assert start_gaps(p) == [0, 1, 2, 4, 4, 4]
        await wait_for(lambda: rt.crashes == 7, rt.changed)
        assert rt.crashes == 7 and rt.crash_streak == 7
        assert rt.last_error == f"worker {p.workers.workers[-1].pid} exited unexpectedly"
        assert rt.state == S.CACHED and "failed" not in states(rt)  # a crash is no failed load

        # a batch that succeeds ends the streak: the next crash restarts at once
        p.workers.crash_on_infer.clear()
        p.workers.auto_answer = True
        t = anyio.current_time()
        assert await result_of(p.submit(rt, "ok")) == {"echo": ["ok"]}
        assert p.workers.load_attempts[-1][1] == pytest.approx(t + 4)  # still backing off (streak 7)
        assert rt.crash_streak == 0
        p.workers.workers[-1].crash()
        await wait_for(lambda: rt.state == S.CACHED, rt.changed)
        assert rt.crash_streak == 1
        t = anyio.current_time()
        await result_of(p.submit(rt, "ok"))
        assert p.workers.load_attempts[-1][1] == t


@on_mock_clock
async def test_a_crash_fails_only_the_running_batch(tmp_path: Path) -> None:
    async with running(tmp_path, max_batch_size=1) as p:
        rt = p.runtime("m")
        running_req = p.submit(rt, "running")
        batch = await p.workers.next_batch()
        queued = p.submit(rt, "queued")
        batch.worker.crash()
        assert isinstance(await error_of(running_req), WorkerCrashed)
        p.workers.auto_answer = True
        assert await result_of(queued) == {"echo": ["queued"]}  # the next worker serves it
        assert len(p.workers.workers) == 2 and rt.crashes == 1


@on_mock_clock
async def test_a_model_uninstalled_during_its_restart_backoff_starts_no_worker(tmp_path: Path) -> None:
    async with running(tmp_path, max_batch_size=1, load_retry_base_s=10) as p:
        p.workers.crash_on_infer.add("m")
        rt = p.runtime("m")
        reqs = [p.submit(rt, f"r{i}") for i in range(3)]
        for req in reqs[:2]:
            assert isinstance(await error_of(req), WorkerCrashed)
        await wait_for(lambda: rt.crash_streak == 2, rt.changed)  # the next start waits 10 s
        p.scheduler.sync([])  # uninstalled meanwhile
        assert (await error_of(reqs[2])).code == "model_not_found"
        await anyio.sleep(60)
        assert len(p.workers.load_attempts) == 2  # no worker for a model that is gone
        assert rt.key not in p.scheduler.models


# -- failed loads -----------------------------------------------------------------------------------


@on_mock_clock
async def test_a_failed_load_fails_fast_and_retries_in_the_background(tmp_path: Path) -> None:
    async with running(tmp_path, load_retry_base_s=1, load_retry_cap_s=60, load_retry_attempts=3) as p:
        p.workers.fail_loads["m"] = 100
        rt = p.runtime("m")
        t0 = anyio.current_time()
        err = await error_of(p.submit(rt, "x"))
        assert isinstance(err, ModelLoadFailed) and err.http_status == 503 and err.code == "model_load_failed"
        assert err.retry_after_s == 1.0
        assert rt.state == S.FAILED and rt.failures == 1

        with pytest.raises(ModelLoadFailed) as refused:  # fails fast: not even queued
            p.submit(rt, "y")
        assert refused.value.retry_after_s == pytest.approx(1.0) and len(rt.queue) == 0

        await wait_for(lambda: rt.failures == 3, rt.changed)
        assert [t - t0 for _, t in p.workers.load_attempts] == [0, 1, 3]  # backoff 1 s, 2 s
        assert rt.retry_at is None  # attempts ran out
        with pytest.raises(ModelLoadFailed, match="no retries left") as refused:
            p.submit(rt, "y")
        assert refused.value.retry_after_s is None
        await anyio.sleep(3600)
        assert len(p.workers.load_attempts) == 3 and rt.state == S.FAILED

        # an explicit load starts over: its attempt fails, and a background retry follows
        p.workers.fail_loads["m"] = 1
        with pytest.raises(ModelLoadFailed) as failed:
            await p.scheduler.load(rt, 30)
        assert failed.value.retry_after_s == 1.0
        assert rt.failures == 1
        t1 = anyio.current_time()
        await wait_for(lambda: rt.state == S.READY, rt.changed)
        assert p.workers.load_attempts[-1][1] == pytest.approx(t1 + 1)
        assert rt.failures == 0 and rt.retry_at is None and rt.last_error is None
        p.workers.auto_answer = True
        assert await result_of(p.submit(rt, "z")) == {"echo": ["z"]}
        assert states(rt) == [
            "loading", "failed", "loading", "failed", "loading", "failed",  # the first three attempts
            "cached", "loading", "failed",  # the explicit load
            "loading", "warming", "ready",  # the background retry that succeeded
        ]  # fmt: skip


@on_mock_clock
async def test_the_retry_backoff_is_capped(tmp_path: Path) -> None:
    async with running(tmp_path, load_retry_base_s=1, load_retry_cap_s=5, load_retry_attempts=6) as p:
        p.workers.fail_loads["m"] = 100
        rt = p.runtime("m")
        p.scheduler.request_load(rt)
        await wait_for(lambda: rt.failures == 6, rt.changed)
        assert start_gaps(p) == [1, 2, 4, 5, 5]


@on_mock_clock
async def test_an_uninstalled_model_stops_retrying(tmp_path: Path) -> None:
    async with running(tmp_path, load_retry_base_s=1, load_retry_attempts=5) as p:
        p.workers.fail_loads["m"] = 100
        rt = p.runtime("m")
        p.scheduler.request_load(rt)
        await wait_for(lambda: rt.failures == 1, rt.changed)
        p.scheduler.sync([])
        await anyio.sleep(3600)
        assert len(p.workers.load_attempts) == 1
        assert ModelKey("m", "1.0.0") not in p.scheduler.models


# -- memory admission and eviction ----------------------------------------------------------------
# Budget 800 MiB; each model: base 100 + 100 MiB of weights x 1.5 = 250 MiB. Three fit, a fourth
# evicts. The fakes' PSS reads as None, so the budget keeps these estimates.

BUDGET = {"memory_budget_mb": 800, "worker_base_mb": 100, "admission_factor": 1.5}


async def load_in_order(p: Policy, names: str, **settings: Any) -> dict[str, ModelRuntime]:
    """Load each model one second after the previous one (older last use first)."""
    rts = {}
    for name in names:
        rts[name] = p.runtime(name, weights_mb=100, **settings.get(name, {}))
        await p.scheduler.load(rts[name], 30)
        await anyio.sleep(1)
    return rts


def loaded(p: Policy) -> set[str]:
    return {rt.key.model_id for rt in p.scheduler.models.values() if rt.loaded}


@on_mock_clock
async def test_the_least_recently_used_idle_model_is_evicted_first(tmp_path: Path) -> None:
    async with running(tmp_path, **BUDGET) as p:
        p.workers.auto_answer = True
        rts = await load_in_order(p, "abc")
        assert p.scheduler.admission.budget.used_mb() == pytest.approx(750)
        await result_of(p.submit(rts["a"], "x"))  # a is now the most recently used: b is the LRU
        await anyio.sleep(1)
        d = p.runtime("d", weights_mb=100)
        await result_of(p.submit(d, "x"))
        assert loaded(p) == {"a", "c", "d"} and rts["b"].evictions == 1
        assert rts["b"].history[-2][1:] == ("unloading", "evict")
        await anyio.sleep(1)
        await result_of(p.submit(rts["b"], "x"))  # b comes back: c is the LRU now
        assert loaded(p) == {"a", "b", "d"} and rts["c"].evictions == 1
        assert p.scheduler.admission.budget.used_mb() == pytest.approx(750)


@on_mock_clock
async def test_a_pinned_model_is_never_evicted(tmp_path: Path) -> None:
    async with running(tmp_path, **BUDGET) as p:
        p.workers.auto_answer = True
        rts = await load_in_order(p, "abc", a={"pinned": True})
        d = p.runtime("d", weights_mb=100)
        await result_of(p.submit(d, "x"))
        assert loaded(p) == {"a", "c", "d"}  # a is the LRU but pinned: b goes
        e = p.runtime("e", weights_mb=100)
        await result_of(p.submit(e, "x"))
        assert loaded(p) == {"a", "d", "e"} and rts["a"].evictions == 0


@on_mock_clock
async def test_busy_models_are_evicted_last_and_finish_their_batch(tmp_path: Path) -> None:
    async with running(tmp_path, **BUDGET) as p:
        p.workers.auto_answer = True
        rts = await load_in_order(p, "abc")
        p.workers.auto_answer = False
        a_req = p.submit(rts["a"], "a-work")
        a_batch = await p.workers.next_batch("a")
        # a is the LRU, but busy: b, the LRU of the idle ones, goes
        d = p.runtime("d", weights_mb=100)
        d_req = p.submit(d, "x")
        (await p.workers.next_batch("d")).answer()
        await result_of(d_req)
        assert loaded(p) == {"a", "c", "d"} and rts["b"].history[-2][1:] == ("unloading", "evict")
        await anyio.sleep(1)

        # a and c busy, d idle: d goes although it was used last
        p.submit(rts["c"], "c-work")
        await p.workers.next_batch("c")
        e = p.runtime("e", weights_mb=100)
        e_req = p.submit(e, "x")
        (await p.workers.next_batch("e")).answer()
        await result_of(e_req)
        assert loaded(p) == {"a", "c", "e"} and d.evictions == 1

        # all busy: the least recently used busy one (a) is asked to stop, and its batch finishes first
        p.submit(e, "e-work")
        await p.workers.next_batch("e")
        f = p.runtime("f", weights_mb=100)
        f_req = p.submit(f, "x")
        await settle(lambda: rts["a"].stop_reason is StopReason.EVICT)
        await anyio.sleep(10)
        a_worker = p.workers.live("a")
        assert a_worker is not None and a_batch.running and not a_batch.cancelled
        assert f.waiting_for_memory is False  # a victim is on its way out: it waits for it, not for room
        assert [m for m, _ in p.workers.load_attempts].count("f") == 0
        a_batch.answer()
        assert await result_of(a_req) == {"echo": ["a-work"]}  # its batch finished
        (await p.workers.next_batch("f")).answer()
        assert await result_of(f_req) == {"echo": ["x"]}
        assert p.workers.of("f")[0].opened_at == a_worker.stopped_at  # admitted as the victim stopped
        assert loaded(p) == {"c", "e", "f"} and rts["a"].evictions == 1


@on_mock_clock
async def test_a_waiting_load_is_admitted_when_room_appears(tmp_path: Path) -> None:
    async with running(tmp_path, **BUDGET) as p:
        p.workers.auto_answer = True
        pinned = {"pinned": True}
        rts = await load_in_order(p, "abc", a=pinned, b=pinned, c=pinned)
        d = p.runtime("d", weights_mb=100)
        req = p.submit(d, "x")
        await wait_for(lambda: d.waiting_for_memory, d.changed)
        await anyio.sleep(600)  # nobody can be evicted: it waits
        assert d.waiting_for_memory and not req.done.is_set() and p.workers.of("d") == []
        await p.scheduler.unload(rts["b"], 5)
        t = anyio.current_time()
        assert await result_of(req) == {"echo": ["x"]}
        assert p.workers.of("d")[0].opened_at == t and not d.waiting_for_memory
        assert loaded(p) == {"a", "c", "d"}


@on_mock_clock
async def test_a_waiting_load_fails_with_insufficient_memory_once_nobody_waits(tmp_path: Path) -> None:
    async with running(tmp_path, **BUDGET) as p:
        p.workers.auto_answer = True
        pinned = {"pinned": True}
        await load_in_order(p, "abc", a=pinned, b=pinned, c=pinned)
        d = p.runtime("d", weights_mb=100)
        req = p.submit(d, "x")
        await wait_for(lambda: d.waiting_for_memory, d.changed)
        error = p.scheduler.unfinished_error(d, 30)
        assert isinstance(error, InsufficientMemory) and error.code == "insufficient_memory"
        await anyio.sleep(30)
        p.scheduler.withdraw(d, req)  # its caller's deadline passed
        await wait_for(lambda: not d.waiting_for_memory, d.changed)
        assert d.last_error is not None and "insufficient memory" in d.last_error
        assert d.state == S.CACHED and p.workers.of("d") == [] and len(d.queue) == 0
        assert p.scheduler.admission.budget.reserved_mb(d) is None


@on_mock_clock
async def test_a_load_that_times_out_waiting_for_memory_stops_waiting(tmp_path: Path) -> None:
    async with running(tmp_path, **BUDGET) as p:
        p.workers.auto_answer = True
        pinned = {"pinned": True}
        rts = await load_in_order(p, "abc", a=pinned, b=pinned, c=pinned)
        d = p.runtime("d", weights_mb=100)
        t0 = anyio.current_time()
        with pytest.raises(InsufficientMemory) as refused:
            await p.scheduler.load(d, 5)
        assert anyio.current_time() == pytest.approx(t0 + 5) and refused.value.retry_after_s == 5
        await wait_for(lambda: not d.waiting_for_memory, d.changed)  # its caller went: nobody waits
        assert d.last_error is not None and "insufficient memory" in d.last_error
        await p.scheduler.unload(rts["b"], 5)
        await anyio.sleep(60)
        assert p.workers.of("d") == [] and d.state == S.CACHED  # room later does not load it behind its back


@on_mock_clock
async def test_a_background_retry_that_finds_no_room_counts_as_a_failed_attempt(tmp_path: Path) -> None:
    async with running(tmp_path, load_retry_base_s=10, load_retry_attempts=3, **BUDGET) as p:
        p.workers.auto_answer = True
        admissions = 0
        admit = p.scheduler.admission.admit

        async def counted(rt: ModelRuntime) -> None:
            nonlocal admissions
            admissions += 1
            if admissions > 20:  # a task that retries in a loop never lets the clock move: stop it here
                await anyio.sleep_forever()
            await admit(rt)

        p.scheduler.admission.admit = counted  # type: ignore[method-assign]
        p.workers.fail_loads["m"] = 1
        m = p.runtime("m", weights_mb=100)
        t0 = anyio.current_time()
        assert isinstance(await error_of(p.submit(m, "x")), ModelLoadFailed)
        assert m.retry_at == pytest.approx(t0 + 10)
        pinned = {"pinned": True}
        rts = await load_in_order(p, "abc", a=pinned, b=pinned, c=pinned)  # the budget fills up meanwhile
        await wait_for(lambda: m.failures == 2, m.changed)
        assert anyio.current_time() == pytest.approx(t0 + 10)
        assert m.state == S.FAILED and m.retry_at == pytest.approx(t0 + 30)  # backs off like a failed load
        assert m.last_error is not None and "insufficient memory" in m.last_error
        await wait_for(lambda: m.failures == 3, m.changed)
        assert m.retry_at is None and admissions == 6  # a, b, c and m's three attempts
        await anyio.sleep(3600)
        assert admissions == 6
        await p.scheduler.unload(rts["a"], 5)
        await p.scheduler.load(m, 30)  # an explicit load starts over
        assert m.state == S.READY and p.workers.of("m")


@on_mock_clock
async def test_a_model_larger_than_the_budget_fails_at_once(tmp_path: Path) -> None:
    async with running(tmp_path, **BUDGET) as p:
        big = p.runtime("big", weights_mb=500)  # 100 + 750 > 800
        err = await error_of(p.submit(big, "x"))
        assert isinstance(err, InsufficientMemory) and "memory_budget_mb" in err.message
        assert p.workers.load_attempts == []


# -- abandoned batches -----------------------------------------------------------------------------


async def test_a_batch_nobody_waits_for_is_cancelled(tmp_path: Path) -> None:
    async with running(tmp_path, max_batch_size=4) as p:
        rt = p.runtime("m")
        await p.scheduler.load(rt, 30)
        one, two = p.submit(rt, "one"), p.submit(rt, "two")  # queued together: one batch
        batch = await p.workers.next_batch()
        assert batch.texts == ["one", "two"]
        p.scheduler.withdraw(rt, one)
        await let_run()
        assert batch.running and not batch.cancelled  # two still wants it
        p.scheduler.withdraw(rt, two)
        await settle(lambda: batch.cancelled and not rt.running)
        assert not batch.worker.dead and rt.cancelled == 2 and rt.served == 0
        p.workers.auto_answer = True
        assert await result_of(p.submit(rt, "next")) == {"echo": ["next"]}  # the worker goes on


async def test_a_batch_with_one_request_still_wanted_keeps_running(tmp_path: Path) -> None:
    async with running(tmp_path, max_batch_size=4) as p:
        rt = p.runtime("m")
        await p.scheduler.load(rt, 30)
        one, two = p.submit(rt, "one"), p.submit(rt, "two")
        batch = await p.workers.next_batch()
        p.scheduler.withdraw(rt, one)
        await let_run()
        batch.answer()
        assert await result_of(two) == {"echo": ["two"]}
        assert not batch.cancelled and rt.served == 2 and rt.cancelled == 1


@on_mock_clock
async def test_a_load_nobody_waits_for_after_its_eviction_starts_no_worker(tmp_path: Path) -> None:
    async with running(tmp_path, **BUDGET) as p:
        p.workers.auto_answer = True
        rts = await load_in_order(p, "abc")
        p.workers.auto_answer = False
        for name in "abc":  # every loaded model busy: the LRU one is asked to stop after its batch
            p.submit(rts[name], f"{name}-work")
        batches = {name: await p.workers.next_batch(name) for name in "abc"}
        d = p.runtime("d", weights_mb=100)
        req = p.submit(d, "x")
        await settle(lambda: rts["a"].stop_reason is StopReason.EVICT)
        p.scheduler.withdraw(d, req)  # its caller gives up while the victim finishes its batch
        batches["a"].answer()
        await wait_for(lambda: not rts["a"].loaded, rts["a"].changed)
        await anyio.sleep(60)
        assert p.workers.of("d") == [] and d.state == S.CACHED  # nobody wants it: no worker
        assert p.scheduler.admission.budget.reserved_mb(d) is None
        for name in "bc":
            batches[name].answer()
