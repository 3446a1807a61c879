"""Scheduling through the REST API with real workers (Echo pipeline), on asyncio and trio:
priorities and ageing, batching, max_wait_ms, deadlines, queue limits, concurrency."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from conftest import BOTH_BACKENDS, AppUnderTest
from worker_pipelines import steps_run

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}


@pytest.fixture
def anyio_backend() -> str:
    """Scheduling policy through real workers; the backend is not what these tests test:
    asyncio only, except the tests marked BOTH_BACKENDS."""
    return "asyncio"


async def post(app: AppUnderTest, text: object, **extra: object) -> tuple[int, dict]:
    r = await app.client.post("/api/v1/infer/echo", json={"input_data": {"text": text}, **extra})
    return r.status_code, r.json()


async def status(app: AppUnderTest) -> dict:
    return (await app.client.get("/api/v1/status")).json()["models"][0]


async def eventually(app: AppUnderTest, check: Callable[[dict], bool], timeout_s: float = 20) -> None:
    """Poll the status endpoint until `check(model status)` holds (observing another process)."""
    for _ in range(int(timeout_s / 0.005)):
        if check(await status(app)):
            return
        await anyio.sleep(0.005)
    raise AssertionError(f"condition not reached within {timeout_s} s: {await status(app)}")


async def wait_queue_depth(app: AppUnderTest, depth: int) -> None:
    await eventually(app, lambda st: st["queue_depth"] >= depth)


async def occupy_worker(app: AppUnderTest, tg: anyio.abc.TaskGroup, seconds: float) -> None:
    """Start a request that keeps the worker busy, and wait until it runs."""
    assert (await post(app, "warm"))[0] == 200
    tg.start_soon(post, app, f"__sleep__{seconds}")
    await eventually(app, lambda st: bool(st.get("worker", {}).get("in_flight_batches")))


@pytest.mark.settings(max_batch_size=1)
@BOTH_BACKENDS
async def test_critical_overtakes_100_low(echo_app: AppUnderTest) -> None:
    done: list[str] = []

    async def one(name: str, priority: object) -> None:
        code, _ = await post(echo_app, name, priority=priority)
        assert code == 200
        done.append(name)

    async with anyio.create_task_group() as tg:
        await occupy_worker(echo_app, tg, 0.5)
        for i in range(100):
            tg.start_soon(one, f"low{i}", "low")
        await wait_queue_depth(echo_app, 100)
        tg.start_soon(one, "critical", 1)
    assert done[0] == "critical"
    assert len(done) == 101


@pytest.mark.settings(max_batch_size=1, priority_aging_ms=150)
async def test_ageing_lets_low_through(echo_app: AppUnderTest) -> None:
    done: list[str] = []

    async def one(name: str, text: str, priority: str) -> None:
        code, _ = await post(echo_app, text, priority=priority)
        assert code == 200
        done.append(name)

    async with anyio.create_task_group() as tg:
        await occupy_worker(echo_app, tg, 0.2)
        tg.start_soon(one, "low", "low", "low")
        await wait_queue_depth(echo_app, 1)
        for i in range(30):
            tg.start_soon(one, f"high{i}", "__sleep__0.04", "high")
    # 30 HIGH requests take ~1.2 s; LOW becomes HIGH after 2 x 150 ms and then goes by arrival
    assert done.index("low") < 15, done


@pytest.mark.settings(priority_aging_ms=0, max_batch_size=1)
async def test_without_ageing_low_waits_for_all_high(echo_app: AppUnderTest) -> None:
    done: list[str] = []

    async def one(name: str, priority: str) -> None:
        await post(echo_app, "x", priority=priority)
        done.append(name)

    async with anyio.create_task_group() as tg:
        await occupy_worker(echo_app, tg, 0.3)
        tg.start_soon(one, "low", "low")
        await wait_queue_depth(echo_app, 1)
        for i in range(10):
            tg.start_soon(one, f"high{i}", "high")
    assert done[-1] == "low"


@pytest.mark.settings(max_batch_size=8)
async def test_64_concurrent_requests_form_full_batches(echo_app: AppUnderTest) -> None:
    results: dict[int, list[list[float]]] = {}

    async def one(i: int) -> None:
        code, body = await post(echo_app, "y" * (i + 1))
        assert code == 200, body
        results[i] = body["output"]["embeddings"]

    async with anyio.create_task_group() as tg:
        await occupy_worker(echo_app, tg, 0.3)
        for i in range(64):
            tg.start_soon(one, i)
    sizes = [rows[0][3] for rows in results.values()]
    assert max(sizes) == 8.0
    assert sizes.count(8.0) >= 56  # all queued while the worker was busy: 8 full batches
    for i, rows in results.items():
        assert rows == [[float(i + 1), float(ord("y") * (i + 1)), rows[0][2], rows[0][3]]]
    st = await status(echo_app)
    assert st["batches"] <= 2 + 8 + 1


async def test_per_model_settings_apply_to_the_next_batch(echo_app: AppUnderTest) -> None:
    r = await echo_app.client.put("/api/v1/models/echo", json={"max_batch_size": 2})
    assert r.status_code == 200 and r.json()["settings"] == {"max_batch_size": 2}
    r = await echo_app.client.put("/api/v1/models/echo", json={"max_batch_size": 0})
    assert r.status_code == 422 and r.json()["error"]["field"] == "$.max_batch_size"
    assert (await echo_app.client.put("/api/v1/models/nope", json={})).status_code == 404
    assert (await echo_app.client.put("/api/v1/models/echo", content=b"{", headers=JSON)).status_code == 400
    await anyio.sleep(1.1)  # the catalog cache
    sizes: list[float] = []

    async def one(i: int) -> None:
        code, body = await post(echo_app, f"t{i}")
        assert code == 200
        sizes.append(body["output"]["embeddings"][0][3])

    async with anyio.create_task_group() as tg:
        await occupy_worker(echo_app, tg, 0.3)
        for i in range(10):
            tg.start_soon(one, i)
    assert max(sizes) == 2.0


@pytest.mark.settings(max_wait_ms=200)
async def test_max_wait_ms_gathers_a_batch_and_bounds_the_wait(echo_app: AppUnderTest) -> None:
    assert (await post(echo_app, "warm"))[0] == 200
    code, body = await post(echo_app, "alone")
    assert code == 200
    assert body["timing"]["queue_ms"] >= 150  # waited for company (alone, it is still served: the wait is bounded)
    got: list[dict] = []

    async def one(text: str) -> None:
        got.append((await post(echo_app, text))[1])

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, "first")
        await anyio.sleep(0.05)
        tg.start_soon(one, "second")
    assert [b["output"]["embeddings"][0][3] for b in got] == [2.0, 2.0]  # one batch


@pytest.mark.settings(max_batch_size=2)
async def test_max_wait_default_is_immediate(echo_app: AppUnderTest) -> None:
    """By default an idle worker takes a lone request at once: a batch of one, though a second
    request would have filled it (with a long max_wait_ms it would wait for that one)."""
    assert echo_app.settings.max_wait_ms == 0
    assert (await post(echo_app, "warm"))[0] == 200
    code, body = await post(echo_app, "now")
    assert code == 200 and body["output"]["embeddings"][0][3] == 1.0
    r = await echo_app.client.put("/api/v1/models/echo", json={"max_wait_ms": 60_000})
    assert r.status_code == 200
    got: list[dict] = []

    async def one(text: str) -> None:
        got.append((await post(echo_app, text))[1])

    async with anyio.create_task_group() as tg:  # now a lone request waits for company
        tg.start_soon(one, "first")
        await wait_queue_depth(echo_app, 1)
        await anyio.sleep(0.2)
        assert (await status(echo_app))["queue_depth"] == 1
        tg.start_soon(one, "second")
    assert [b["output"]["embeddings"][0][3] for b in got] == [2.0, 2.0]


@BOTH_BACKENDS
async def test_deadline_passes_while_queued(echo_app: AppUnderTest) -> None:
    async with anyio.create_task_group() as tg:
        await occupy_worker(echo_app, tg, 0.6)
        code, body = await post(echo_app, "late", timeout_seconds=0.1)
        assert code == 504 and body["error"]["code"] == "deadline_exceeded"
        st = await status(echo_app)
        assert st["queue_depth"] == 0 and st["cancelled"] == 1  # removed at once, never dispatched
    served_before = (await status(echo_app))["served"]
    assert (await post(echo_app, "next"))[0] == 200
    assert (await status(echo_app))["served"] == served_before + 1


@pytest.mark.settings(queue_limit=3, max_batch_size=1)
@BOTH_BACKENDS
async def test_queue_full_is_429_and_leaves_the_queue_alone(echo_app: AppUnderTest) -> None:
    codes: list[int] = []

    async def one(i: int) -> None:
        codes.append((await post(echo_app, f"q{i}"))[0])

    async with anyio.create_task_group() as tg:
        await occupy_worker(echo_app, tg, 0.4)
        for i in range(3):
            tg.start_soon(one, i)
        await wait_queue_depth(echo_app, 3)
        r = await echo_app.client.post("/api/v1/infer/echo", json={"input_data": {"text": "over"}})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1
    assert codes == [200, 200, 200]


@pytest.mark.parametrize("n", [10, pytest.param(256, marks=pytest.mark.slow)])
async def test_many_concurrent_requests_without_errors(echo_app: AppUnderTest, n: int) -> None:
    codes: list[int] = []

    async def one(i: int) -> None:
        code, body = await post(echo_app, f"c{i}")
        codes.append(code)
        assert body["output"]["embeddings"][0][0] == float(len(f"c{i}"))

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    assert codes == [200] * n


async def test_cancelled_long_job_stops_within_one_step(echo_app: AppUnderTest) -> None:
    assert (await post(echo_app, "warm"))[0] == 200
    code, _ = await post(echo_app, "__steps__300", timeout_seconds=0.35)  # 30 s of 0.1 s steps
    assert code == 504
    code, _ = await post(echo_app, "next")  # one batch at a time: after the abandoned one ended
    assert code == 200
    # the worker dropped the abandoned job at a step instead of running it to its end
    model_dir = echo_app.store.get("echo").versions[0].path  # type: ignore[union-attr]
    assert 1 <= steps_run(model_dir) < 300


@BOTH_BACKENDS
async def test_cancelling_one_of_a_shared_batch_keeps_it_running(echo_app: AppUnderTest) -> None:
    assert (await post(echo_app, "warm"))[0] == 200
    results: dict[str, int] = {}

    async def one(name: str, timeout_s: float) -> None:
        results[name] = (await post(echo_app, "__steps__5", timeout_seconds=timeout_s))[0]

    async with anyio.create_task_group() as tg:
        await occupy_worker(echo_app, tg, 0.2)
        tg.start_soon(one, "patient", 10.0)
        tg.start_soon(one, "hasty", 0.4)  # same params: both ride in one batch of 0.5 s
    assert results == {"hasty": 504, "patient": 200}
