"""The server-wide decoded-pixel budget on the request path: requests wait for room within their
deadline (then 503), a request larger than the budget is refused, and every request gives its
pixels back when it is answered, whatever the outcome (asyncio and trio)."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from PIL import Image

from modelmora.ipc import segments
from modelmora.registry import SQLiteStore, install
from modelmora.scheduler import Scheduler

from conftest import AppUnderTest, make_settings, running_app, worker_env

pytestmark = pytest.mark.anyio


@pytest.fixture
async def image_app(tmp_path: Path, echo_dir: Path) -> AsyncIterator[AppUnderTest]:
    home = tmp_path / "home"
    # room for one 64x64 image at a time
    settings = make_settings(home, max_decoded_pixels_in_flight=64 * 64, max_request_pixels=64 * 64)
    store = SQLiteStore(home / "registry.sqlite3")
    install(store, home, str(echo_dir), model_id="img", task="img2embed")
    pipelines = {"img2embed": "worker_pipelines:ImageStats"}
    scheduler = Scheduler(settings, segments.new_instance_id(), pipelines=pipelines, worker_env=worker_env())
    async with running_app(settings, store, scheduler) as app:
        yield app


def png(side: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10, 20, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def embed(app: AppUnderTest, image: str, **extra: object) -> tuple[int, dict[str, object]]:
    r = await app.client.post("/api/v1/infer/img", json={"input_data": {"image": image}, **extra})
    return r.status_code, r.json()


async def test_requests_give_their_pixels_back(image_app: AppUnderTest) -> None:
    assert (await embed(image_app, png(64)))[0] == 200
    assert (await embed(image_app, png(64), parameters={"normalize": "no"}))[0] == 422
    status = (await image_app.client.get("/api/v1/status")).json()["images"]
    assert status == {"capacity_pixels": 4096, "in_use_pixels": 0, "waiting": 0, "waiting_pixels": 0}


async def test_a_request_waits_for_room_then_gets_503(image_app: AppUnderTest) -> None:
    lease = await image_app.service.pixels.acquire(64 * 64, math.inf)  # another request's images
    code, body = await embed(image_app, png(32), timeout_seconds=0.3)
    assert code == 503
    assert body["error"]["code"] == "image_budget_exhausted"  # type: ignore[index]
    got: list[int] = []
    async with anyio.create_task_group() as tg:

        async def waiting() -> None:
            got.append((await embed(image_app, png(32)))[0])

        tg.start_soon(waiting)
        for _ in range(1000):  # until it waits for room (another task's state)
            if image_app.service.pixels.statistics().waiting:
                break
            await anyio.sleep(0.01)
        lease.release()  # room again: the waiting request goes on
    assert got == [200]


async def test_a_request_larger_than_the_budget_is_refused(image_app: AppUnderTest) -> None:
    code, body = await embed(image_app, [png(64), png(64)])  # type: ignore[arg-type]
    assert code == 413
    assert "max_" in body["error"]["message"]  # type: ignore[index]
