"""The REST API over a real scheduler and real worker processes (Echo pipeline), on asyncio and trio."""

from __future__ import annotations

import base64
import os
import struct

import anyio
import pytest
import structlog

from conftest import ECHO_LAYOUT, AppUnderTest

pytestmark = pytest.mark.anyio


async def infer(app: AppUnderTest, body: object, model: str = "echo") -> tuple[int, dict]:
    r = await app.client.post(f"/api/v1/infer/{model}", json=body)
    return r.status_code, r.json()


async def test_single_and_list(echo_app: AppUnderTest) -> None:
    status, body = await infer(echo_app, {"input_data": {"text": "abc"}})
    assert status == 200, body
    assert body["model_id"] == "echo" and body["version"] == "1.0.0" and body["task_type"] == "txt2embed"
    assert body["output"]["dim"] == 4
    assert body["output"]["embeddings"] == [[3.0, float(ord("a") + ord("b") + ord("c")), 0.0, 1.0]]
    assert set(body["timing"]) == {"queue_ms", "inference_ms", "total_ms"}
    texts = [f"t{i}" * (i + 1) for i in range(50)]
    status, body = await infer(echo_app, {"input_data": {"text": texts}})
    assert status == 200
    assert [row[0] for row in body["output"]["embeddings"]] == [float(len(t)) for t in texts]


async def test_base64_encoding(echo_app: AppUnderTest) -> None:
    status, body = await infer(echo_app, {"input_data": {"text": ["ab"]}, "parameters": {"encoding": "base64"}})
    assert status == 200
    raw = base64.b64decode(body["output"]["embeddings"][0])
    assert struct.unpack("<4f", raw) == (2.0, float(ord("a") + ord("b")), 0.0, 1.0)


async def test_worker_is_another_process(echo_app: AppUnderTest) -> None:
    await infer(echo_app, {"input_data": {"text": "x"}})
    r = await echo_app.client.get("/api/v1/status")
    (model,) = r.json()["models"]
    assert model["state"] == "ready"
    assert model["worker"]["pid"] != os.getpid()


async def test_concurrent_requests_each_get_their_own_result(echo_app: AppUnderTest) -> None:
    results: dict[int, list[list[float]]] = {}

    async def one(i: int) -> None:
        status, body = await infer(echo_app, {"input_data": {"text": ["x" * (i + 1)] * (1 + i % 3)}})
        assert status == 200, body
        results[i] = body["output"]["embeddings"]

    async with anyio.create_task_group() as tg:
        for i in range(64):
            tg.start_soon(one, i)
    for i, rows in results.items():
        assert len(rows) == 1 + i % 3
        assert all(row[0] == float(i + 1) for row in rows)
    # at least one batch held several requests (index in batch > 0 on a request's first row)
    assert any(rows[0][2] > 0 for rows in results.values())


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"input_data": {"text": []}}, 422, "invalid_input", "$.input_data.text"),
        ({"input_data": {"text": ["a", 3]}}, 422, "invalid_input", "$.input_data.text[1]"),
        ({"input_data": {"image": "x"}}, 422, "invalid_input", "$.input_data"),
        (
            {"input_data": {"text": "a"}, "parameters": {"normalize": "yes"}},
            422,
            "invalid_input",
            "$.parameters.normalize",
        ),
        ({"input_data": {"text": "a"}, "priority": 9}, 422, "invalid_input", "$.priority"),
        ({"input_data": {"text": "a"}, "timeout_seconds": -1}, 422, "invalid_input", "$.timeout_seconds"),
        ({"text": "a"}, 422, "invalid_input", "$"),
        ({"input_data": {"text": "a"}, "version": "9.9.9"}, 404, "model_not_found", "$.version"),
        ({"input_data": {"text": ["ok", "__bad__"]}}, 422, "invalid_input", "$.input_data.text[1]"),
    ],
)
async def test_bad_input(echo_app: AppUnderTest, body: object, status: int, code: str, field: str) -> None:
    got_status, got = await infer(echo_app, body)
    assert got_status == status, got
    assert got["error"]["code"] == code
    assert got["error"].get("field") == field
    assert got["error"]["message"]
    # the server and the worker survive: a good request still works
    ok, _ = await infer(echo_app, {"input_data": {"text": "fine"}})
    assert ok == 200


@pytest.mark.parametrize(
    ("body", "field", "choices"),
    [
        ({"priority": "urgent"}, "$.priority", "critical, high, low, medium, normal"),
        ({"return": "s3"}, "$.return", "auto, inline, url"),
        ({"parameters": {"encoding": "hex"}}, "$.parameters.encoding", "base64, float"),
    ],
)
async def test_a_refused_enum_value_lists_the_accepted_ones(
    echo_app: AppUnderTest, body: dict[str, object], field: str, choices: str
) -> None:
    status, got = await infer(echo_app, {"input_data": {"text": "a"}, **body})
    assert status == 422 and got["error"]["field"] == field
    assert got["error"]["message"].endswith(f"(expected one of: {choices})")


async def test_priority_names_in_either_case(echo_app: AppUnderTest) -> None:
    for name in ("CRITICAL", "critical", "HIGH", "MEDIUM", "low"):
        status, got = await infer(echo_app, {"input_data": {"text": "a"}, "priority": name})
        assert status == 200, got


async def test_model_settings_enum_lists_the_accepted_values(echo_app: AppUnderTest) -> None:
    r = await echo_app.client.put("/api/v1/models/echo", json={"dtype": "fp8"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "$.dtype"
    assert r.json()["error"]["message"].endswith("(expected one of: auto, bfloat16, float16, float32)")


async def test_unknown_model_and_malformed_json(echo_app: AppUnderTest) -> None:
    status, body = await infer(echo_app, {"input_data": {"text": "a"}}, model="nope")
    assert status == 404 and body["error"]["code"] == "model_not_found" and "nope" in body["error"]["message"]
    r = await echo_app.client.post(
        "/api/v1/infer/echo", content=b'{"input_data": ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_request"
    r = await echo_app.client.get("/api/v1/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await echo_app.client.get("/api/v1/infer/echo")
    assert r.status_code == 405


@pytest.mark.settings(max_body_bytes=1000, max_texts_per_request=3, max_text_chars=50)
async def test_limits(echo_app: AppUnderTest) -> None:
    status, body = await infer(echo_app, {"input_data": {"text": "x" * 2000}})
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    assert "1000" in body["error"]["message"]
    status, body = await infer(echo_app, {"input_data": {"text": ["a"] * 4}})
    assert status == 422 and body["error"]["field"] == "$.input_data.text"
    status, body = await infer(echo_app, {"input_data": {"text": ["a", "y" * 51]}})
    assert status == 422 and body["error"]["field"] == "$.input_data.text[1]"


async def test_pipeline_error_is_500_without_internals(echo_app: AppUnderTest) -> None:
    status, body = await infer(echo_app, {"input_data": {"text": "__raise__"}})
    assert status == 500 and body["error"]["code"] == "inference_failed"
    assert "boom" not in body["error"]["message"]
    assert (await infer(echo_app, {"input_data": {"text": "again"}}))[0] == 200


async def test_worker_crash_fails_that_request_then_restarts(echo_app: AppUnderTest) -> None:
    await infer(echo_app, {"input_data": {"text": "warm"}})
    pid1 = (await echo_app.client.get("/api/v1/status")).json()["models"][0]["worker"]["pid"]
    r = await echo_app.client.post("/api/v1/infer/echo", json={"input_data": {"text": "__crash__"}})
    assert r.status_code == 503
    body = r.json()
    assert body["error"]["code"] == "worker_crashed" and "echo" in body["error"]["message"]
    assert r.headers["retry-after"] == "1"
    status, _ = await infer(echo_app, {"input_data": {"text": "after"}})
    assert status == 200
    model = (await echo_app.client.get("/api/v1/status")).json()["models"][0]
    assert model["worker"]["pid"] != pid1
    assert model["crashes"] == 1 and model["loads"] == 2


async def test_deadline(echo_app: AppUnderTest) -> None:
    status, body = await infer(echo_app, {"input_data": {"text": "__sleep__1.5"}, "timeout_seconds": 0.3})
    assert status == 504 and body["error"]["code"] == "deadline_exceeded"
    status, _ = await infer(echo_app, {"input_data": {"text": "next"}})
    assert status == 200


@pytest.mark.settings(load_retry_base_s=1.0, load_retry_cap_s=1.0)
async def test_load_failure_then_recovery(echo_app: AppUnderTest) -> None:
    rec = echo_app.store.get("echo")
    assert rec is not None
    flag = anyio.Path(rec.versions[0].path) / "FAIL_WARMUP"
    await flag.touch()
    r = await echo_app.client.post("/api/v1/infer/echo", json={"input_data": {"text": "a"}})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed"
    assert "warm-up failure" in r.json()["error"]["message"] and "retrying" in r.json()["error"]["message"]
    assert int(r.headers["retry-after"]) >= 1
    r = await echo_app.client.get("/health/models")
    assert r.status_code == 503 and r.json()["models"][0]["healthy"] is False
    # never routed to while failed: the next request fails at once, without a new load
    before = (await echo_app.client.get("/api/v1/status")).json()["models"][0]
    status, body = await infer(echo_app, {"input_data": {"text": "b"}})
    assert status == 503 and body["error"]["code"] == "model_load_failed"
    after = (await echo_app.client.get("/api/v1/status")).json()["models"][0]
    assert after["state"] == "failed" and after["history"] == before["history"]  # no load for it
    # background retries with backoff keep failing while the fault is there
    for _ in range(400):
        if (await echo_app.client.get("/api/v1/status")).json()["models"][0]["failures"] >= 2:
            break
        await anyio.sleep(0.05)
    await flag.unlink()
    for _ in range(400):  # a background retry recovers the model
        if (await echo_app.client.get("/health/models")).status_code == 200:
            break
        await anyio.sleep(0.05)
    status, _ = await infer(echo_app, {"input_data": {"text": "a"}})
    assert status == 200
    model = (await echo_app.client.get("/api/v1/status")).json()["models"][0]
    assert model["state"] == "ready" and model["failures"] == 0 and model["last_error"] is None


@pytest.mark.settings(request_ring_mb=1, response_ring_mb=1, max_body_bytes=16 * 2**20, max_text_chars=4 * 2**20)
async def test_payload_larger_than_ring(echo_app: AppUnderTest) -> None:
    big = "é" * (2**20)  # 2 MiB of UTF-8, twice the ring
    status, body = await infer(echo_app, {"input_data": {"text": [big, "small"]}})
    assert status == 200, body
    assert body["output"]["embeddings"][0][0] == float(len(big))
    status, body = await infer(echo_app, {"input_data": {"text": [big]}})
    assert status == 200


async def test_health_and_models(echo_app: AppUnderTest) -> None:
    assert (await echo_app.client.get("/health/live")).json() == {"status": "ok"}
    assert (await echo_app.client.get("/health/ready")).status_code == 200
    models = (await echo_app.client.get("/api/v1/models")).json()["models"]
    assert [m["id"] for m in models] == ["echo"]
    assert models[0]["versions"][0]["files"] == 1 + len(ECHO_LAYOUT)  # weights.bin and the layout's files
    assert (await echo_app.client.get("/api/v1/models?task_type=txt2img")).json()["models"] == []
    assert (await echo_app.client.get("/api/v1/models/echo")).json()["task_type"] == "txt2embed"
    assert (await echo_app.client.get("/api/v1/models/nope")).status_code == 404
    status = (await echo_app.client.get("/api/v1/status")).json()
    assert status["supervisor"]["torch_imported"] in (True, False)


async def test_model_installed_while_running_is_served(echo_app: AppUnderTest, echo_dir) -> None:  # type: ignore[no-untyped-def]
    from modelmora.registry import install

    assert (await infer(echo_app, {"input_data": {"text": "a"}}, model="echo2"))[0] == 404
    install(echo_app.store, echo_app.home, str(echo_dir), model_id="echo2", task="txt2embed")
    await anyio.sleep(1.1)  # the catalog caches misses for at most 1 s
    assert (await infer(echo_app, {"input_data": {"text": "a"}}, model="echo2"))[0] == 200


async def test_openapi_and_docs(echo_app: AppUnderTest) -> None:
    doc = (await echo_app.client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    assert "/api/v1/infer/{model_id}" in doc["paths"]
    schemas = doc["components"]["schemas"]
    assert schemas["TextInput"]["properties"]["text"]
    assert schemas["InferRequest"]["properties"]["input_data"]["oneOf"]
    html = (await echo_app.client.get("/docs")).text
    assert "/docs/assets/swagger-ui-bundle.js" in html and "cdn" not in html.lower()
    js = await echo_app.client.get("/docs/assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    css = await echo_app.client.get("/docs/assets/swagger-ui.css")
    assert css.status_code == 200


@pytest.mark.settings(load_retry_base_s=1.5)
async def test_a_worker_that_keeps_crashing_restarts_with_backoff(echo_app: AppUnderTest) -> None:
    for _ in range(2):
        status, body = await infer(echo_app, {"input_data": {"text": "__crash__"}})
        assert status == 503 and body["error"]["code"] == "worker_crashed"
    t0 = anyio.current_time()
    with structlog.testing.capture_logs() as logs:
        status, body = await infer(echo_app, {"input_data": {"text": "fine"}})
    assert status == 200
    assert anyio.current_time() - t0 >= 1.4  # the third start waited for the backoff
    backoffs = [e for e in logs if e["event"] == "restart_backoff"]
    assert [(e["crashes"], e["delay_s"]) for e in backoffs] == [(2, 1.5)]
    status, body = await infer(echo_app, {"input_data": {"text": "__crash__"}})
    assert status == 503
    with structlog.testing.capture_logs() as logs:
        assert (await infer(echo_app, {"input_data": {"text": "fine"}}))[0] == 200
    # a success in between reset the streak: this restart did not back off
    assert [e for e in logs if e["event"] == "restart_backoff"] == []
    model = (await echo_app.client.get("/api/v1/status")).json()["models"][0]
    assert model["crashes"] == 3 and model["state"] == "ready"
