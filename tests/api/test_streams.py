"""Inference streams: a worker whose pipeline is `concurrent` runs up to `inference_streams`
batches at once (real worker processes, on asyncio and trio)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from test_scheduling import eventually, post, status

from modelmora.ipc import segments
from modelmora.registry import SQLiteStore, install
from modelmora.scheduler import Scheduler

from conftest import BOTH_BACKENDS, AppUnderTest, make_settings, running_app, worker_env
from worker_pipelines import steps_run

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """Inference streams in real workers; the backend is not what these tests test:
    asyncio only, except the tests marked BOTH_BACKENDS."""
    return "asyncio"


CONCURRENT = {"txt2embed": "worker_pipelines:ConcurrentEcho"}
PLAIN = {"txt2embed": "worker_pipelines:Echo"}
THREADS = {"txt2embed": "torch_pipelines:TorchThreads"}


@pytest.fixture
async def streams_app(tmp_path: Path, echo_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[AppUnderTest]:
    marker = request.node.get_closest_marker("settings")
    overrides = {"inference_streams": 2, "torch_threads": 2, **(marker.kwargs if marker else {})}
    pipelines = overrides.pop("pipelines", CONCURRENT)
    home = tmp_path / "home"
    settings = make_settings(home, **overrides)
    store = SQLiteStore(home / "registry.sqlite3")
    install(store, home, str(echo_dir), model_id="echo", task="txt2embed")
    scheduler = Scheduler(settings, segments.new_instance_id(), pipelines=pipelines, worker_env=worker_env())
    async with running_app(settings, store, scheduler) as app:
        yield app


def in_flight(st: dict) -> int:
    return int(st.get("worker", {}).get("in_flight_batches", 0))


@pytest.mark.settings(max_batch_size=2)
@BOTH_BACKENDS
async def test_a_full_batch_runs_beside_the_running_one(streams_app: AppUnderTest) -> None:
    assert (await post(streams_app, "warm"))[0] == 200
    assert (await status(streams_app))["worker"]["streams"] == 2
    async with anyio.create_task_group() as tg:
        tg.start_soon(post, streams_app, "__sleep__3.0")
        await eventually(streams_app, lambda st: in_flight(st) == 1)
        for _ in range(2):  # a full batch (2 items): it goes to the second stream at once
            tg.start_soon(post, streams_app, "__sleep__0.1")
        # side by side, not one after the other: both batches are in the worker together
        await eventually(streams_app, lambda st: in_flight(st) == 2)
        # and the short batch is answered while the long one still runs
        await eventually(streams_app, lambda st: st["served"] == 3 and in_flight(st) == 1)


@pytest.mark.settings(max_batch_size=4)
async def test_a_partial_batch_waits_for_the_running_one(streams_app: AppUnderTest) -> None:
    """Under light load one batch at a time: arrivals during a batch join the next one."""
    assert (await post(streams_app, "warm"))[0] == 200
    async with anyio.create_task_group() as tg:
        tg.start_soon(post, streams_app, "__sleep__0.6")
        await eventually(streams_app, lambda st: in_flight(st) == 1)
        results: list[dict] = []

        async def one(text: str) -> None:
            code, body = await post(streams_app, text)
            assert code == 200
            results.append(body)

        for text in ("ab", "abc"):
            tg.start_soon(one, text)
        await eventually(streams_app, lambda st: st["queue_depth"] == 2)
        for _ in range(20):
            st = await status(streams_app)
            assert in_flight(st) == 1 or st["queue_depth"] == 0
            await anyio.sleep(0.01)
    assert sorted(r["output"]["embeddings"][0][3] for r in results) == [2.0, 2.0]  # one batch of the two


@pytest.mark.settings(max_batch_size=4, pipelines=PLAIN)
async def test_a_pipeline_that_is_not_concurrent_gets_one_stream(streams_app: AppUnderTest) -> None:
    assert (await post(streams_app, "warm"))[0] == 200
    assert (await status(streams_app))["worker"]["streams"] == 1
    async with anyio.create_task_group() as tg:
        tg.start_soon(post, streams_app, "__sleep__0.5")
        await eventually(streams_app, lambda st: in_flight(st) == 1)
        for _ in range(4):
            tg.start_soon(post, streams_app, "__sleep__0.01")
        await eventually(streams_app, lambda st: st["queue_depth"] == 4)
        assert in_flight(await status(streams_app)) == 1


@pytest.mark.settings(max_batch_size=4, inference_streams=3, torch_threads=3)
async def test_out_of_order_batches_each_caller_gets_its_own_result(streams_app: AppUnderTest) -> None:
    """Batches finish out of order (some sleep): every caller still gets the row of its own text,
    and the rings keep working (their spans are released in order)."""
    rng = random.Random(5)
    texts = [
        "__sleep__0.05" if i % 9 == 0 else "".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 3000)))
        for i in range(240)
    ]
    got: dict[int, list[float]] = {}

    async def one(i: int) -> None:
        code, body = await post(streams_app, texts[i])
        assert code == 200, body
        got[i] = body["output"]["embeddings"][0]

    async with anyio.create_task_group() as tg:
        for i in range(len(texts)):
            tg.start_soon(one, i)
    for i, text in enumerate(texts):
        assert got[i][:2] == [float(len(text)), float(sum(map(ord, text)))], i
    st = await status(streams_app)
    assert st["served"] == len(texts) and st["worker"]["request_ring_used_bytes"] == 0


@pytest.mark.settings(max_batch_size=1)
@BOTH_BACKENDS
async def test_a_cancelled_batch_stops_while_the_other_stream_goes_on(streams_app: AppUnderTest) -> None:
    assert (await post(streams_app, "warm"))[0] == 200
    outcome: dict[str, int] = {}

    async def one(name: str, text: str, timeout_s: float = 60) -> None:
        code, _ = await post(streams_app, text, timeout_seconds=timeout_s)
        outcome[name] = code

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, "long", "__steps__300", 0.5)  # 30 s of 0.1 s steps
        await eventually(streams_app, lambda st: in_flight(st) == 1)
        tg.start_soon(one, "short", "__steps__10")  # 1 s
        await eventually(streams_app, lambda st: in_flight(st) == 2)
    assert outcome == {"long": 504, "short": 200}
    await eventually(streams_app, lambda st: in_flight(st) == 0)  # the long one stopped
    model_dir = streams_app.store.get("echo").versions[0].path  # type: ignore[union-attr]
    assert steps_run(model_dir) < 10 + 300  # at a step, not at its end
    assert (await post(streams_app, "after"))[0] == 200


@pytest.mark.parametrize(
    ("asked", "device", "threads", "runs"),
    [(0, "cuda", 1, 2), (0, "cuda:1", 16, 2), (0, "cpu", 4, 1), (3, "cpu", 2, 2), (3, "cuda", 1, 3), (2, "cpu", 1, 1)],
)
def test_stream_count(asked: int, device: str, threads: int, runs: int) -> None:
    """0 means two on a GPU and one on a CPU; on a CPU each stream needs a thread of its own."""
    from modelmora_workers.worker import stream_count

    assert stream_count(asked, device, threads) == runs


@pytest.mark.settings(inference_streams=0, torch_threads=1)
@pytest.mark.parametrize(("device", "streams"), [("cpu", 1), ("cuda", 2)])
async def test_the_default_is_two_streams_on_a_gpu_and_one_on_a_cpu(
    streams_app: AppUnderTest, device: str, streams: int
) -> None:
    r = await streams_app.client.put("/api/v1/models/echo", json={"device": device})  # Echo claims a GPU
    assert r.status_code == 200
    assert (await post(streams_app, "x"))[0] == 200
    st = await status(streams_app)
    assert st["device"] == device and st["worker"]["streams"] == streams


@pytest.mark.slow  # imports torch in its worker
@pytest.mark.settings(max_batch_size=1, pipelines=THREADS)
async def test_a_batch_alone_gets_every_thread_and_one_beside_another_its_share(streams_app: AppUnderTest) -> None:
    """2 streams, 2 torch threads: alone a batch runs on 2; started beside a running one, on 1."""

    async def threads(text: str) -> float:
        code, body = await post(streams_app, text)
        assert code == 200, body
        return float(body["output"]["embeddings"][0][0])

    assert await threads("alone") == 2
    got: dict[str, float] = {}

    async def one(name: str, text: str) -> None:
        got[name] = await threads(text)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, "first", "__sleep__0.8")
        await eventually(streams_app, lambda st: in_flight(st) == 1)
        tg.start_soon(one, "beside", "__sleep__0.1")
    assert got == {"first": 2, "beside": 1}
    assert await threads("alone again") == 2
