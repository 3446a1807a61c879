"""The server-wide decoded-pixel budget (issue 12), alone and through `load_images` (asyncio and trio).

Deadlines are on AnyIO's clock; on trio a `MockClock` makes an hour-long wait instant. No test bounds
wall-clock time: they assert grants, queues and errors.
"""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Callable

import anyio
import anyio.from_thread
import pytest
from PIL import Image
from trio.testing import MockClock

from modelmora.config import Settings
from modelmora.errors import ImageBudgetExhausted, InvalidInput, PayloadTooLarge
from modelmora.images import ImageLimits, LoadedImages, PixelBudget, PixelLease, Pixels, load_images
from modelmora.images import load as image_load

pytestmark = pytest.mark.anyio

FIELD = "$.input_data.image"
LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20, fetch_timeout_s=5, allow_private_urls=False)

mock_clock_trio = pytest.mark.parametrize("anyio_backend", [("trio", {"clock": MockClock(autojump_threshold=0)})])
"""On trio with a clock that jumps to the next deadline whenever every task waits."""


def png(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (width % 256, height % 256, 7)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def truncated_png(width: int, height: int) -> str:
    """A PNG whose header is whole (the size can be read) but whose pixel data is cut short."""
    buf = io.BytesIO()
    Image.effect_noise((width, height), 64).convert("RGB").save(buf, "PNG")
    return base64.b64encode(buf.getvalue()[: len(buf.getvalue()) // 2]).decode("ascii")


async def until(condition: Callable[[], bool]) -> None:
    """Let the other tasks run until `condition` holds (failing, not hanging, if it never does).

    The first tries only yield; later ones sleep, so that a step running in a worker thread (the
    header probe) has time to finish on a busy machine: about a minute in all before it fails.
    """
    for attempt in range(12_000):
        if condition():
            return
        await anyio.sleep(0 if attempt < 1_000 else 0.005)
    raise AssertionError("the condition never held")


async def waiting(budget: PixelBudget, count: int) -> None:
    """Until `count` requests wait in `budget` (they queue at their first checkpoint)."""
    await until(lambda: budget.statistics().waiting == count)


# --- PixelBudget ---------------------------------------------------------------------------------


async def test_a_lease_holds_its_pixels_until_released() -> None:
    budget = PixelBudget(100)
    lease = await budget.acquire(60)
    assert (lease.pixels, budget.in_use_pixels) == (60, 60)
    with await budget.acquire(40) as second:
        assert budget.in_use_pixels == 100 and not second.released
    assert second.released and budget.in_use_pixels == 60
    lease.release()
    lease.release()  # once only
    assert budget.in_use_pixels == 0 and lease.released
    assert budget.statistics().capacity_pixels == 100


async def test_a_request_larger_than_the_whole_budget_is_refused_at_once() -> None:
    budget = PixelBudget(100)
    with pytest.raises(PayloadTooLarge) as info:
        await budget.acquire(101, anyio.current_time() + 3600)
    assert info.value.http_status == 413
    assert "max_decoded_pixels_in_flight" in info.value.message
    assert budget.statistics().waiting == 0 and budget.in_use_pixels == 0


async def test_waiters_are_granted_in_arrival_order_and_none_overtakes_the_head() -> None:
    """A small request that would fit waits behind a big one: the big one is never starved."""
    budget = PixelBudget(10)
    first = await budget.acquire(6)
    granted: list[str] = []
    leases: dict[str, PixelLease] = {}

    async def wait_for(name: str, pixels: int) -> None:
        leases[name] = await budget.acquire(pixels)
        granted.append(name)

    async with anyio.create_task_group() as tg:
        for count, (name, pixels) in enumerate([("big", 6), ("small", 1), ("rest", 4)], start=1):
            tg.start_soon(wait_for, name, pixels)
            await waiting(budget, count)
        stats = budget.statistics()
        assert (stats.waiting, stats.waiting_pixels, granted) == (3, 11, [])  # "small" fits, but waits
        first.release()
        await until(lambda: len(leases) == 2)
        assert budget.statistics().waiting == 1 and budget.in_use_pixels == 7 and sorted(leases) == ["big", "small"]
        leases["big"].release()
    # big and small were granted together (small never before big: nothing was granted while big
    # waited); the order their tasks then resumed in is the event loop's (trio varies it)
    assert sorted(granted[:2]) == ["big", "small"] and granted[2] == "rest"
    assert budget.in_use_pixels == 5


async def test_the_deadline_gives_503_and_lets_the_next_waiter_in() -> None:
    budget = PixelBudget(10)
    held = await budget.acquire(5)
    outcome: dict[str, object] = {}

    async def head() -> None:
        try:
            await budget.acquire(8, anyio.current_time() + 0.05)
        except ImageBudgetExhausted as exc:
            outcome["head"] = exc

    async def behind() -> None:
        outcome["behind"] = await budget.acquire(5)

    async with anyio.create_task_group() as tg:
        tg.start_soon(head)
        await waiting(budget, 1)
        tg.start_soon(behind)  # fits now, but waits behind the head until the head gives up
    error = outcome["head"]
    assert isinstance(error, ImageBudgetExhausted)
    assert (error.http_status, error.code) == (503, "image_budget_exhausted")
    assert error.retry_after_s is not None and error.retry_after_s > 0
    assert "max_decoded_pixels_in_flight" in error.message
    assert isinstance(outcome["behind"], PixelLease) and budget.in_use_pixels == 10
    held.release()
    assert budget.statistics().waiting == 0


@mock_clock_trio
async def test_a_waiter_waits_until_its_deadline_on_the_budget_clock() -> None:
    budget = PixelBudget(10)
    await budget.acquire(10)
    start = anyio.current_time()
    with pytest.raises(ImageBudgetExhausted):
        await budget.acquire(1, start + 3600)
    assert anyio.current_time() - start >= 3600
    assert budget.statistics().waiting == 0


async def test_a_cancelled_waiter_leaves_the_queue_and_unblocks_those_behind() -> None:
    budget = PixelBudget(10)
    held = await budget.acquire(4)
    leases: list[PixelLease] = []

    head_scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: _acquire_in(head_scope, budget, 7, leases))
        await waiting(budget, 1)
        tg.start_soon(lambda: _acquire_in(None, budget, 6, leases))
        await waiting(budget, 2)
        head_scope.cancel()
    assert [lease.pixels for lease in leases] == [6]
    assert budget.in_use_pixels == 10 and budget.statistics().waiting == 0
    held.release()


async def _acquire_in(scope: anyio.CancelScope | None, budget: PixelBudget, pixels: int, out: list[PixelLease]) -> None:
    with scope or anyio.CancelScope():
        out.append(await budget.acquire(pixels))


async def test_a_waiter_cancelled_as_it_is_granted_keeps_nothing() -> None:
    """Release and cancellation in the same step: either the waiter returns its lease, or the budget
    takes the pixels back; none is lost."""
    budget = PixelBudget(10)
    held = await budget.acquire(10)
    got: list[PixelLease] = []
    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: _acquire_in(scope, budget, 10, got))
        await waiting(budget, 1)
        held.release()  # grants the waiter ...
        scope.cancel()  # ... which is cancelled before it runs again
    assert budget.in_use_pixels == sum(lease.pixels for lease in got if not lease.released)
    for lease in got:
        lease.release()
    assert budget.in_use_pixels == 0 and budget.statistics().waiting == 0


def test_the_setting_sizes_the_budget() -> None:
    settings = Settings()
    assert settings.max_decoded_pixels_in_flight == 4 * settings.max_request_pixels
    assert PixelBudget.from_settings(Settings(max_decoded_pixels_in_flight=123)).capacity_pixels == 123
    with pytest.raises(ValueError, match="at least 1"):
        PixelBudget(0)


# --- load_images with a budget ---------------------------------------------------------------------


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pixel counts of the images `load_images` decodes (after taking its lease)."""
    seen: list[int] = []
    original = image_load.decode_image

    def counted(data: bytes, field: str, limits: ImageLimits) -> Pixels:
        pixels = original(data, field, limits)
        seen.append(pixels.width * pixels.height)
        return pixels

    monkeypatch.setattr(image_load, "decode_image", counted)
    return seen


async def test_the_loaded_images_hold_their_pixels_until_released(monkeypatch: pytest.MonkeyPatch) -> None:
    budget = PixelBudget(10_000)
    decoded = count_decodes(monkeypatch)
    loaded = await load_images([png(30, 20), png(10, 5)], FIELD, LIMITS, budget=budget)
    assert isinstance(loaded, LoadedImages) and isinstance(loaded, list)
    assert [(p.width, p.height) for p in loaded] == [(30, 20), (10, 5)]
    assert loaded.lease is not None and loaded.lease.pixels == 650 == budget.in_use_pixels
    assert sorted(decoded) == [50, 600]
    with loaded:
        pass
    assert budget.in_use_pixels == 0
    assert (await load_images([], FIELD, LIMITS, budget=budget)) == []
    no_budget = await load_images([png(2, 2)], FIELD, LIMITS)
    assert no_budget.lease is None and no_budget[0].width == 2
    no_budget.release()


async def test_a_request_waits_for_room_then_gets_503_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    budget = PixelBudget(1000)
    decoded = count_decodes(monkeypatch)
    held = await budget.acquire(500)
    with pytest.raises(ImageBudgetExhausted):
        await load_images([png(30, 20)], FIELD, LIMITS, budget=budget, deadline=anyio.current_time() + 0.05)
    assert decoded == [] and budget.in_use_pixels == 500 and budget.statistics().waiting == 0
    # once the room is there, the same request goes through
    async with anyio.create_task_group() as tg:
        results: list[LoadedImages] = []

        async def load() -> None:
            results.append(await load_images([png(30, 20)], FIELD, LIMITS, budget=budget))

        tg.start_soon(load)
        await waiting(budget, 1)
        assert decoded == []
        held.release()
    assert decoded == [600] and budget.in_use_pixels == 600
    results[0].release()


@mock_clock_trio
async def test_load_images_waits_until_the_deadline_on_the_budget_clock() -> None:
    budget = PixelBudget(1000)
    held = await budget.acquire(1000)
    start = anyio.current_time()
    with pytest.raises(ImageBudgetExhausted):
        await load_images([png(3, 3)], FIELD, LIMITS, budget=budget, deadline=start + 600)
    assert anyio.current_time() - start >= 600
    held.release()
    assert budget.in_use_pixels == 0


async def test_a_request_over_the_whole_budget_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = count_decodes(monkeypatch)
    with pytest.raises(PayloadTooLarge) as info:
        await load_images([png(30, 20), png(30, 20)], FIELD, LIMITS, budget=PixelBudget(1000))
    assert "max_decoded_pixels_in_flight" in info.value.message and decoded == []


async def test_the_request_total_is_checked_from_the_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = count_decodes(monkeypatch)
    limits = ImageLimits(
        max_bytes=1 << 20, max_pixels=1000, fetch_timeout_s=5, allow_private_urls=False, max_request_pixels=1000
    )
    budget = PixelBudget(10_000)
    with pytest.raises(PayloadTooLarge) as info:
        await load_images([png(30, 20), png(30, 20)], FIELD, limits, budget=budget)
    assert info.value.field == FIELD and "max_request_pixels" in info.value.message
    assert decoded == [] and budget.in_use_pixels == 0


async def test_a_decoding_error_releases_the_lease() -> None:
    budget = PixelBudget(100_000)
    with pytest.raises(InvalidInput) as info:
        await load_images([png(10, 10), truncated_png(64, 64)], FIELD, LIMITS, budget=budget)
    assert info.value.field == f"{FIELD}[1]" and "truncated" in info.value.message
    assert budget.in_use_pixels == 0


async def test_a_request_cancelled_while_decoding_releases_the_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    budget = PixelBudget(100_000)
    started = anyio.Event()
    go = threading.Event()
    original = image_load.decode_image

    def blocked(data: bytes, field: str, limits: ImageLimits) -> Pixels:
        anyio.from_thread.run_sync(started.set)
        go.wait(60)
        return original(data, field, limits)

    monkeypatch.setattr(image_load, "decode_image", blocked)
    finished: list[LoadedImages] = []

    async def load() -> None:
        finished.append(await load_images([png(10, 10)], FIELD, LIMITS, budget=budget))

    async with anyio.create_task_group() as tg:
        tg.start_soon(load)
        await started.wait()
        assert budget.in_use_pixels == 100
        tg.cancel_scope.cancel()
        go.set()
    assert finished == [] and budget.in_use_pixels == 0


async def test_a_request_cancelled_while_waiting_leaves_no_trace() -> None:
    budget = PixelBudget(100)
    held = await budget.acquire(100)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: load_images([png(5, 5)], FIELD, LIMITS, budget=budget))
        await waiting(budget, 1)
        tg.cancel_scope.cancel()
    assert budget.statistics().waiting == 0 and budget.in_use_pixels == 100
    held.release()


async def test_concurrent_requests_never_exceed_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Twelve requests of 600 pixels through a budget of 1,500: at most two decode at once, all served."""
    budget = PixelBudget(1500)
    peak = 0
    original = image_load.decode_image

    def watched(data: bytes, field: str, limits: ImageLimits) -> Pixels:
        nonlocal peak
        peak = max(peak, budget.in_use_pixels)  # read from a thread: a snapshot is enough
        return original(data, field, limits)

    monkeypatch.setattr(image_load, "decode_image", watched)
    served: list[int] = []

    async def request() -> None:
        with await load_images([png(30, 20)], FIELD, LIMITS, budget=budget) as loaded:
            await anyio.sleep(0.001)
            served.append(loaded[0].width * loaded[0].height)

    async with anyio.create_task_group() as tg:
        for _ in range(12):
            tg.start_soon(request)
    assert served == [600] * 12 and 600 <= peak <= 1200 and budget.in_use_pixels == 0


async def test_no_deadline_means_wait_as_long_as_it_takes() -> None:
    budget = PixelBudget(10)
    held = await budget.acquire(10)
    async with anyio.create_task_group() as tg:
        leases: list[PixelLease] = []
        tg.start_soon(lambda: _acquire_in(None, budget, 10, leases))
        await waiting(budget, 1)
        held.release()
    assert leases[0].pixels == 10
