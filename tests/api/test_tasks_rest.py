"""Every task type through the REST API, the scheduler, shared memory and real worker processes
(asyncio and trio), with light stand-in pipelines (tests/worker_pipelines.py) instead of models:
images arrive in the worker as raw pixels, texts and PNGs come back, events stream as SSE,
generated images go to the filesystem result store at signed URLs.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from PIL import Image

from modelmora.ipc import segments
from modelmora.registry import SQLiteStore, install
from modelmora.scheduler import Scheduler

from conftest import AppUnderTest, make_settings, running_app, worker_env
from worker_pipelines import steps_run

pytestmark = pytest.mark.anyio

PIPELINES = {
    "img2embed": "worker_pipelines:ImageStats",
    "img2txt": "worker_pipelines:Describe",
    "txt2txt": "worker_pipelines:Shout",
    "txt2img": "worker_pipelines:Painter",
}


@pytest.fixture
async def task_app(tmp_path: Path, echo_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[AppUnderTest]:
    marker = request.node.get_closest_marker("settings")
    home = tmp_path / "home"
    settings = make_settings(home, **(marker.kwargs if marker else {}))
    store = SQLiteStore(home / "registry.sqlite3")
    for task in PIPELINES:
        install(store, home, str(echo_dir), model_id=task, task=task)
    scheduler = Scheduler(settings, segments.new_instance_id(), pipelines=PIPELINES, worker_env=worker_env())
    async with running_app(settings, store, scheduler) as app:
        yield app


def png(width: int, height: int, color: tuple[int, int, int], fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


async def infer(app: AppUnderTest, model: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    r = await app.client.post(f"/api/v1/infer/{model}", json=body)
    return r.status_code, r.json()


async def test_images_reach_the_worker_as_raw_pixels(task_app: AppUnderTest) -> None:
    images = [png(5, 3, (255, 0, 0)), "data:image/jpeg;base64," + png(8, 8, (0, 0, 255), "JPEG"), png(2, 7, (9, 9, 9))]
    code, body = await infer(task_app, "img2embed", {"input_data": {"image": images}})
    assert code == 200, body
    rows = body["output"]["embeddings"]
    assert body["task_type"] == "img2embed" and body["output"]["dim"] == 5 and len(rows) == 3
    assert rows[0] == [3.0, 5.0, 255.0, 0.0, 0.0]
    assert rows[1][:2] == [8.0, 8.0] and rows[1][4] > 240 and rows[1][2] < 15  # JPEG: blue, within loss
    assert rows[2] == [7.0, 2.0, 9.0, 9.0, 9.0]
    code, one = await infer(task_app, "img2embed", {"input_data": {"image": images[0]}})
    assert code == 200 and one["output"]["embeddings"] == [rows[0]]


@pytest.mark.parametrize(
    ("image", "status", "field"),
    [
        ("not base64 at all!", 422, "$.input_data.image"),
        (base64.b64encode(b"\x89PNG\r\n\x1a\n garbage").decode(), 422, "$.input_data.image"),
        (png(4, 4, (1, 2, 3), "GIF"), 422, "$.input_data.image"),
        (png(300, 300, (1, 2, 3)), 413, "$.input_data.image"),
        ("http://127.0.0.1:9/cat.png", 422, "$.input_data.image"),
        ("http://169.254.169.254/latest/meta-data", 422, "$.input_data.image"),
        ("ftp://example.com/cat.png", 422, "$.input_data.image"),
    ],
)
@pytest.mark.settings(max_image_pixels=200 * 200)
async def test_bad_images_are_refused_before_the_queue(
    task_app: AppUnderTest, image: str, status: int, field: str
) -> None:
    code, body = await infer(task_app, "img2embed", {"input_data": {"image": image}})
    assert code == status, body
    assert body["error"]["field"] == field
    code, body = await infer(task_app, "img2embed", {"input_data": {"image": [png(2, 2, (0, 0, 0)), image]}})
    assert code == status and body["error"]["field"] == "$.input_data.image[1]"
    # nothing reached a worker: the model was never even started
    assert all(m["loads"] == 0 for m in (await task_app.client.get("/api/v1/status")).json()["models"])


async def test_wrong_task_fields(task_app: AppUnderTest) -> None:
    code, body = await infer(task_app, "txt2txt", {"input_data": {"image": png(2, 2, (0, 0, 0))}})
    assert code == 422 and body["error"]["field"] == "$.input_data"
    code, body = await infer(task_app, "img2txt", {"input_data": {"text": "hello"}})
    assert code == 422 and body["error"]["field"] == "$.input_data"
    code, body = await infer(task_app, "txt2img", {"input_data": {"text": "x"}, "parameters": {"width": 100}})
    assert code == 422 and body["error"]["field"] == "$.parameters.width"
    code, body = await infer(task_app, "txt2txt", {"input_data": {"text": "x"}, "parameters": {"top_p": 0}})
    assert code == 422 and body["error"]["field"] == "$.parameters.top_p"
    code, body = await infer(task_app, "img2embed", {"input_data": {"image": png(2, 2, (0, 0, 0))}, "stream": True})
    assert code == 422 and body["error"]["field"] == "$.stream"


async def test_captions_and_generation(task_app: AppUnderTest) -> None:
    code, body = await infer(
        task_app, "img2txt", {"input_data": {"image": [png(640, 48, (0, 0, 0)), png(3, 4, (0, 0, 0))]}}
    )
    assert code == 200, body
    assert body["output"] == {"texts": ["640x48", "3x4"], "finish_reasons": ["stop", "stop"]}
    code, body = await infer(
        task_app, "img2txt", {"input_data": {"image": png(640, 48, (0, 0, 0))}, "parameters": {"max_tokens": 3}}
    )
    assert body["output"] == {"texts": ["640"], "finish_reasons": ["length"]}
    code, body = await infer(task_app, "txt2txt", {"input_data": {"text": ["abc", "héllo wörld"]}})
    assert code == 200, body
    assert body["output"] == {"texts": ["ABC", "HÉLLO WÖRLD"], "finish_reasons": ["stop", "stop"]}
    assert body["task_type"] == "txt2txt" and body["timing"]["total_ms"] > 0


async def read_sse(response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    kind = ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield kind, json.loads(line.removeprefix("data: "))


async def test_streamed_tokens_then_the_result(task_app: AppUnderTest) -> None:
    body = {"input_data": {"text": "__slow__0.02"}, "stream": True}
    events: list[tuple[str, Any, float]] = []
    async with task_app.client.stream("POST", "/api/v1/infer/txt2txt", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        async for kind, data in read_sse(r):
            events.append((kind, data, anyio.current_time()))
    kinds = [k for k, _, _ in events]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"token"} and len(kinds) == 13
    assert "".join(d["text"] for k, d, _ in events if k == "token") == "__SLOW__0.02"
    assert all(d["index"] == 0 for k, d, _ in events if k == "token")
    assert events[-1][1]["output"]["texts"] == ["__SLOW__0.02"]
    # (httpx's ASGI transport buffers the body: the timing of events is checked over real HTTP in tests/e2e)


async def test_stream_errors_and_refusals(task_app: AppUnderTest) -> None:
    # a deadline passing mid-stream ends the stream with an error event (the worker is started first)
    assert (await infer(task_app, "txt2txt", {"input_data": {"text": "warm"}}))[0] == 200
    body = {"input_data": {"text": "__slow__0.2"}, "stream": True, "timeout_seconds": 0.7}
    async with task_app.client.stream("POST", "/api/v1/infer/txt2txt", json=body) as r:
        events = [e async for e in read_sse(r)]
    assert events[-1][0] == "error" and events[-1][1]["error"]["code"] == "deadline_exceeded"
    assert 0 < len(events) - 1 < 12
    # refused before anything is streamed: a plain JSON error
    r = await task_app.client.post("/api/v1/infer/txt2txt", json={"input_data": {"text": []}, "stream": True})
    assert r.status_code == 422 and r.json()["error"]["field"] == "$.input_data.text"


async def test_generated_images_at_signed_urls(task_app: AppUnderTest) -> None:
    body = {"input_data": {"text": ["a", "b"]}, "parameters": {"width": 72, "height": 40, "seed": 7}}
    code, out = await infer(task_app, "txt2img", body)
    assert code == 200, out
    images = out["output"]["images"]
    assert len(images) == 2 and all(set(i) == {"url", "expires_at"} for i in images)
    assert images[0]["url"].startswith("http://test/api/v1/results/")
    r = await task_app.client.get(images[0]["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.size == (72, 40) and img.getpixel((0, 0)) == ((97 + 7) % 256, 0, 255 - (97 + 7) % 256)
    tampered = images[0]["url"].replace("sig=", "sig=0")
    assert (await task_app.client.get(tampered)).status_code == 403
    # the same seed and prompt give the same bytes; inline on request
    code, again = await infer(task_app, "txt2img", {**body, "return": "inline"})
    assert code == 200 and set(again["output"]["images"][0]) == {"b64_png"}
    assert base64.b64decode(again["output"]["images"][0]["b64_png"]) == r.content


@pytest.mark.settings(result_store="inline")
async def test_inline_result_store(task_app: AppUnderTest) -> None:
    code, out = await infer(task_app, "txt2img", {"input_data": {"text": "a"}})
    assert code == 200 and set(out["output"]["images"][0]) == {"b64_png"}
    code, out = await infer(task_app, "txt2img", {"input_data": {"text": "a"}, "return": "url"})
    assert code == 422 and out["error"]["field"] == "$.return"


async def test_progress_streams_and_cancelled_generation_frees_the_worker(task_app: AppUnderTest) -> None:
    body = {"input_data": {"text": "p"}, "parameters": {"steps": 4}, "stream": True}
    async with task_app.client.stream("POST", "/api/v1/infer/txt2img", json=body) as r:
        events = [e async for e in read_sse(r)]
    assert [d for k, d in events if k == "progress"] == [{"step": i, "steps": 4} for i in range(1, 5)]
    assert events[-1][0] == "result" and "url" in events[-1][1]["output"]["images"][0]
    # a long generation whose client gives up stops at a step; the next request is served after it
    assert (await infer(task_app, "txt2txt", {"input_data": {"text": "warm"}}))[0] == 200  # loaded: the next one runs
    with anyio.move_on_after(0.3):  # 64 tokens (the default max_tokens) of 0.1 s
        await infer(task_app, "txt2txt", {"input_data": {"text": "__slow__0.1 " + "x" * 100}})
    code, out = await infer(task_app, "txt2txt", {"input_data": {"text": "ok"}})
    assert code == 200 and out["output"]["texts"] == ["OK"]
    model_dir = task_app.store.get("txt2txt").versions[0].path  # type: ignore[union-attr]
    assert 1 <= steps_run(model_dir) < 64  # it ran, and stopped at a step instead of at its end


async def test_generation_batches(task_app: AppUnderTest) -> None:
    results: dict[int, list[str]] = {}

    async def one(i: int) -> None:
        code, out = await infer(task_app, "txt2txt", {"input_data": {"text": f"__slow__0.01 #{i}"}})
        assert code == 200, out
        results[i] = out["output"]["texts"]

    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(one, i)
    assert results == {i: [f"__SLOW__0.01 #{i}"] for i in range(12)}
    (model,) = [m for m in (await task_app.client.get("/api/v1/status")).json()["models"] if m["model_id"] == "txt2txt"]
    assert model["served"] == 12 and model["batches"] < 12


@pytest.mark.parametrize(
    ("model", "input_data"),
    [
        ("img2embed", lambda i: {"image": png(i + 1, 2, (i, 0, 0))}),
        ("img2txt", lambda i: {"image": png(i + 1, 2, (i, 0, 0))}),
        ("txt2txt", lambda i: {"text": f"p{i}"}),
    ],
)
@pytest.mark.settings(max_wait_ms=300)
async def test_every_batching_task_batches(task_app: AppUnderTest, model: str, input_data: Any) -> None:
    """Concurrent requests of a batching task share forward passes; each gets its own result."""
    assert (await infer(task_app, model, {"input_data": input_data(0)}))[0] == 200  # the worker runs
    outputs: dict[int, dict[str, Any]] = {}

    async def one(i: int) -> None:
        code, out = await infer(task_app, model, {"input_data": input_data(i)})
        assert code == 200, out
        outputs[i] = out["output"]

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(one, i)
    expected = {
        "img2embed": lambda i: {"embeddings": [[2.0, i + 1.0, float(i), 0.0, 0.0]], "dim": 5},
        "img2txt": lambda i: {"texts": [f"{i + 1}x2"], "finish_reasons": ["stop"]},
        "txt2txt": lambda i: {"texts": [f"P{i}"], "finish_reasons": ["stop"]},
    }[model]
    assert outputs == {i: expected(i) for i in range(8)}
    (st,) = [m for m in (await task_app.client.get("/api/v1/status")).json()["models"] if m["model_id"] == model]
    assert st["served"] == 9 and st["batches"] <= 4


@pytest.mark.settings(max_request_pixels=100 * 100)
async def test_the_images_of_one_request_share_a_pixel_budget(task_app: AppUnderTest) -> None:
    code, body = await infer(task_app, "img2embed", {"input_data": {"image": [png(80, 80, (0, 0, 0))] * 2}})
    assert code == 413 and body["error"]["field"] == "$.input_data.image"
    assert "max_request_pixels" in body["error"]["message"]
    code, body = await infer(task_app, "img2embed", {"input_data": {"image": [png(70, 70, (0, 0, 0))] * 2}})
    assert code == 200
