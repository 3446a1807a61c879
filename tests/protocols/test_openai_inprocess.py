"""The OpenAI front end in process, over a real scheduler whose txt2txt worker runs a light test
pipeline (Shout: the prompt upper-cased, one character per step): a streaming client that goes
away stops its generation at a step, and the worker serves the next request."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from modelmora.ipc import segments
from modelmora.registry import SQLiteStore, install
from modelmora.scheduler import Scheduler

from conftest import BOTH_BACKENDS, AppUnderTest, make_settings, running_app, worker_env
from worker_pipelines import steps_run

pytestmark = [pytest.mark.anyio, BOTH_BACKENDS]


@pytest.fixture
async def shout_app(tmp_path: Path, echo_dir: Path) -> AsyncIterator[AppUnderTest]:
    home = tmp_path / "home"
    settings = make_settings(home)
    store = SQLiteStore(home / "registry.sqlite3")
    install(store, home, str(echo_dir), model_id="shout", task="txt2txt")
    pipelines = {"txt2txt": "worker_pipelines:Shout"}
    scheduler = Scheduler(settings, segments.new_instance_id(), pipelines=pipelines, worker_env=worker_env())
    async with running_app(settings, store, scheduler) as app:
        yield app


async def test_a_stream_whose_client_goes_away_stops_at_a_step(shout_app: AppUnderTest) -> None:
    client = shout_app.client
    body = {"model": "shout", "prompt": ["ab", "c"], "max_tokens": 5, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        lines = [line async for line in r.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    texts = {i: "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in (0, 1)}
    assert texts == {0: "AB", 1: "C"}
    slow = {"model": "shout", "prompt": "__slow__0.1 " + "x" * 100, "max_tokens": 64, "stream": True}
    with anyio.move_on_after(0.3):  # 64 tokens of 0.1 s
        async with client.stream("POST", "/v1/completions", json=slow) as r:
            async for _ in r.aiter_lines():
                pass
    r2 = await client.post("/v1/completions", json={"model": "shout", "prompt": "ok"})
    assert r2.status_code == 200 and r2.json()["choices"][0]["text"] == "OK"
    model_dir = shout_app.store.get("shout").versions[0].path  # type: ignore[union-attr]
    assert 1 <= steps_run(model_dir) < 64  # it ran, and stopped at a step instead of at its end


async def test_usage_is_zero_where_the_pipeline_counts_no_tokens(shout_app: AppUnderTest) -> None:
    r = await shout_app.client.post("/v1/completions", json={"model": "shout", "prompt": "hi", "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["text"] for c in body["choices"]] == ["HI", "HI"]
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
