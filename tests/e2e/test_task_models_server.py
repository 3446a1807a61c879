"""End to end with tiny random-weight models of the four other task types: built locally,
registered with `mm install DIR` (task detected from the files), served by `mm serve` with
workers forked from the zygote, called over real HTTP."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from serverproc import ServerProcess, mm
from tiny_models import build_blip, build_clip, build_gpt2, build_sd, build_t5

pytestmark = pytest.mark.slow  # real server processes

BUILDERS = {"gpt2": build_gpt2, "t5": build_t5, "blip": build_blip, "clip": build_clip, "sd": build_sd}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    src = tmp_path_factory.mktemp("tiny-models")
    home = tmp_path_factory.mktemp("tasks-home")
    for name, build in BUILDERS.items():
        mm("install", str(build(src / name)), "--id", name, home=home)
    # diffusers is not listed: the registered txt2img model adds it
    env = {"MODELMORA_TORCH_THREADS": "1", "MODELMORA_ZYGOTE_PRELOAD": "numpy,torch,transformers"}
    srv = ServerProcess(home, env).start()
    try:
        yield srv
    finally:
        assert srv.stop() == 0


def infer(server: ServerProcess, model: str, body: dict[str, Any]) -> httpx.Response:
    """The request, with a deadline a cold load on a busy machine fits in (the server's default is 30 s)."""
    return httpx.post(f"{server.url}/api/v1/infer/{model}", json={"timeout_seconds": 300, **body}, timeout=330)


def b64_image(width: int, height: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_tasks_were_detected_at_install(server: ServerProcess) -> None:
    models = httpx.get(f"{server.url}/api/v1/models").json()["models"]
    assert {m["id"]: m["task_type"] for m in models} == {
        "gpt2": "txt2txt",
        "t5": "txt2txt",
        "blip": "img2txt",
        "clip": "img2embed",
        "sd": "txt2img",
    }


def test_image_embeddings(server: ServerProcess) -> None:
    images = [b64_image(40, 30, 1), b64_image(64, 64, 2), b64_image(17, 33, 3)]
    r = infer(server, "clip", {"input_data": {"image": images}, "parameters": {"normalize": True}})
    assert r.status_code == 200, r.text
    out = r.json()["output"]
    emb = np.asarray(out["embeddings"], dtype=np.float32)
    assert emb.shape == (3, out["dim"]) and out["dim"] == 16
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    alone = infer(server, "clip", {"input_data": {"image": images[1]}, "parameters": {"normalize": True}})
    assert np.allclose(alone.json()["output"]["embeddings"][0], emb[1], atol=1e-5)  # batch-mates do not matter
    bad = infer(server, "clip", {"input_data": {"image": [images[0], "aGVsbG8="]}})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "$.input_data.image[1]"


def test_captions(server: ServerProcess) -> None:
    body = {"input_data": {"image": [b64_image(32, 32, 4), b64_image(50, 20, 5)]}, "parameters": {"max_tokens": 5}}
    r = infer(server, "blip", body)
    assert r.status_code == 200, r.text
    out = r.json()["output"]
    assert len(out["texts"]) == 2 and all(isinstance(t, str) for t in out["texts"])
    assert set(out["finish_reasons"]) <= {"stop", "length"}
    assert infer(server, "blip", body).json()["output"] == out  # greedy by default: deterministic


def test_generation_is_deterministic_with_a_seed_whatever_the_batch(server: ServerProcess) -> None:
    def gen(prompt: str, seed: int | None) -> dict[str, Any]:
        params: dict[str, Any] = {"max_tokens": 12, "temperature": 0.9}
        if seed is not None:
            params["seed"] = seed
        r = infer(server, "gpt2", {"input_data": {"text": prompt}, "parameters": params})
        assert r.status_code == 200, r.text
        return dict(r.json()["output"])

    alone = gen("the quick brown fox", 42)
    assert alone == gen("the quick brown fox", 42)
    assert alone["finish_reasons"][0] in ("stop", "length")
    with ThreadPoolExecutor(8) as pool:  # the same request among concurrent ones
        outs = list(pool.map(lambda i: gen("the quick brown fox" if i % 2 else f"prompt {i}", 42), range(8)))
    assert all(o == alone for o in outs[1::2])


def test_a_prompt_the_model_refuses_leaves_the_worker_serving(server: ServerProcess) -> None:
    r = infer(server, "gpt2", {"input_data": {"text": ["fine", "word " * 400]}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "$.input_data.text[1]"
    pid = next(
        m["worker"]["pid"] for m in httpx.get(f"{server.url}/api/v1/status").json()["models"] if m["model_id"] == "gpt2"
    )
    r = infer(server, "gpt2", {"input_data": {"text": "fine"}, "parameters": {"max_tokens": 3}})
    assert r.status_code == 200
    status = httpx.get(f"{server.url}/api/v1/status").json()
    assert next(m["worker"]["pid"] for m in status["models"] if m["model_id"] == "gpt2") == pid


def test_tokens_stream_before_generation_ends(server: ServerProcess) -> None:
    body = {"input_data": {"text": "once upon a time"}, "parameters": {"max_tokens": 120, "temperature": 0}}
    body["stream"] = True
    arrivals: list[tuple[float, str, dict[str, Any]]] = []
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{server.url}/api/v1/infer/gpt2", json=body, timeout=180) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                arrivals.append((time.perf_counter() - t0, kind, json.loads(line.removeprefix("data: "))))
    kinds = [k for _, k, _ in arrivals]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"token"} and len(kinds) > 2
    result = arrivals[-1][2]
    assert "".join(d["text"] for _, k, d in arrivals if k == "token") == result["output"]["texts"][0]
    # the first token reached the client while the worker was still generating
    first, last = arrivals[0][0], arrivals[-1][0]
    assert first < last and last - first >= 0.5 * result["timing"]["inference_ms"] / 1e3 - 0.05
    plain = infer(server, "gpt2", {**body, "stream": False}).json()
    assert plain["output"] == result["output"]


def test_an_encoder_decoder_model_generates_and_streams(server: ServerProcess) -> None:
    body: dict[str, Any] = {"input_data": {"text": ["translate: a cat", "hello"]}}
    body["parameters"] = {"max_tokens": 10, "temperature": 0}
    plain = infer(server, "t5", body)
    assert plain.status_code == 200, plain.text
    out = plain.json()["output"]
    assert len(out["texts"]) == 2 and all(r in ("stop", "length") for r in out["finish_reasons"])
    with httpx.stream("POST", f"{server.url}/api/v1/infer/t5", json={**body, "stream": True}, timeout=180) as r:
        lines = [line for line in r.iter_lines() if line.startswith(("event: ", "data: "))]
    kinds = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert kinds[-1] == "result" and data[-1]["output"] == out
    for item in range(2):
        tokens = [d["text"] for k, d in zip(kinds, data, strict=True) if k == "token" and d["index"] == item]
        assert "".join(tokens) == out["texts"][item]


def test_images_generated_at_signed_urls(server: ServerProcess) -> None:
    params = {"steps": 3, "seed": 5, "width": 48, "height": 40}
    r = infer(server, "sd", {"input_data": {"text": ["a red cube", "a blue ball"]}, "parameters": params})
    assert r.status_code == 200, r.text
    images = r.json()["output"]["images"]
    assert len(images) == 2 and all(i["expires_at"] > time.time() for i in images)
    got = httpx.get(images[0]["url"], timeout=30)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(got.content)).size == (48, 40)
    # the same seed alone gives the same picture
    again = infer(server, "sd", {"input_data": {"text": "a red cube"}, "parameters": params, "return": "inline"})
    assert base64.b64decode(again.json()["output"]["images"][0]["b64_png"]) == got.content
    assert httpx.get(images[0]["url"].replace("sig=", "sig=ff"), timeout=30).status_code == 403


def test_progress_events_while_an_image_is_generated(server: ServerProcess) -> None:
    body = {"input_data": {"text": "steps"}, "parameters": {"steps": 4, "seed": 1}, "stream": True}
    with httpx.stream("POST", f"{server.url}/api/v1/infer/sd", json=body, timeout=180) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line.removeprefix("data: ")) for line in lines]
    assert events[:-1] == [{"step": i, "steps": 4} for i in range(1, 5)]
    assert "url" in events[-1]["output"]["images"][0]


def test_every_task_model_has_its_own_worker(server: ServerProcess) -> None:
    status = httpx.get(f"{server.url}/api/v1/status").json()
    assert not status["supervisor"]["torch_imported"]
    assert status["zygote"]["preload"] == ["numpy", "torch", "transformers", "diffusers"]
    assert status["zygote"]["forks"] >= len(BUILDERS) and status["zygote"]["spawned_instead"] == 0
    workers = {m["model_id"]: m["worker"]["pid"] for m in status["models"] if "worker" in m}
    assert set(workers) == set(BUILDERS) and len(set(workers.values())) == len(BUILDERS)
