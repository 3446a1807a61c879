"""The async jobs REST API in process, over a real scheduler, real Echo workers and the SQLite job
store, with the runner running (asyncio and trio): submit, poll, result, cancel queued and running,
idempotent resubmit, retries of transient failures, permanent failures, and every refusal."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from jobs.conftest import JobsApp
from modelmora.jobs import TERMINAL

from worker_pipelines import steps_run

pytestmark = pytest.mark.anyio


async def submit(app: JobsApp, text: object, headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    return await app.client.post(
        "/api/v1/infer/echo/async", json={"input_data": {"text": text}, **extra}, headers=headers
    )


async def wait_for(app: JobsApp, job_id: str, statuses: frozenset[str] | set[str] = TERMINAL) -> dict[str, Any]:
    while True:
        r = await app.client.get(f"/api/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        if r.json()["status"] in statuses:
            return dict(r.json())
        await anyio.sleep(0.02)


async def test_submit_poll_and_result(jobs_app: JobsApp) -> None:
    r = await submit(jobs_app, ["abc", "de"], priority="high")
    assert r.status_code == 202, r.text
    body = r.json()
    assert set(body) == {"job_id", "status"} and body["status"] in ("queued", "running")
    assert r.headers["location"] == f"/api/v1/jobs/{body['job_id']}"
    job = await wait_for(jobs_app, body["job_id"])
    assert job["status"] == "completed" and job["attempts"] == 1 and job["error"] is None
    assert job["priority"] == 2 and job["progress"] == 1.0
    assert job["created_at"] <= job["started_at"] <= job["finished_at"] < job["expires_at"]
    assert job["result_url"] == f"/api/v1/jobs/{body['job_id']}/result"
    result = (await jobs_app.client.get(job["result_url"])).json()
    assert result["model_id"] == "echo" and result["task_type"] == "txt2embed"
    assert [row[:2] for row in result["output"]["embeddings"]] == [[3.0, 294.0], [2.0, 201.0]]
    listed = (await jobs_app.client.get("/api/v1/jobs?model=echo&status=completed")).json()
    assert listed["total"] == 1 and listed["jobs"][0]["id"] == body["job_id"]


async def test_base64_encoding_is_kept(jobs_app: JobsApp) -> None:
    r = await submit(jobs_app, "ab", parameters={"encoding": "base64"})
    job = await wait_for(jobs_app, r.json()["job_id"])
    result = (await jobs_app.client.get(job["result_url"])).json()
    assert isinstance(result["output"]["embeddings"][0], str)


async def test_unknown_job_is_404(jobs_app: JobsApp) -> None:
    for method, path in (
        ("GET", "/api/v1/jobs/nope"),
        ("DELETE", "/api/v1/jobs/nope"),
        ("GET", "/api/v1/jobs/nope/result"),
    ):
        r = await jobs_app.client.request(method, path)
        assert r.status_code == 404, (method, path)
        assert r.json()["error"]["code"] == "job_not_found"
        assert "nope" in r.json()["error"]["message"]


@pytest.mark.settings(job_concurrency=1)
async def test_cancel_queued_and_running_and_unfinished_result(jobs_app: JobsApp) -> None:
    running = (await submit(jobs_app, "__steps__300")).json()["job_id"]  # 30 s of 0.1 s steps
    await wait_for(jobs_app, running, {"running"})
    queued = (await submit(jobs_app, "later")).json()["job_id"]  # concurrency 1: it waits
    r = await jobs_app.client.get(f"/api/v1/jobs/{queued}/result")
    assert r.status_code == 409
    assert r.json()["error"] == {
        "code": "job_not_finished",
        "message": f"job {queued!r} is queued: it has no result",
        "status": "queued",
    }
    r = await jobs_app.client.get(f"/api/v1/jobs/{running}/result")
    assert r.status_code == 409 and r.json()["error"]["status"] == "running"
    r = await jobs_app.client.delete(f"/api/v1/jobs/{queued}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["attempts"] == 0
    while steps_run(jobs_app.model_dir) < 1:  # noqa: ASYNC110 - a file is what there is to watch
        await anyio.sleep(0.02)
    r = await jobs_app.client.delete(f"/api/v1/jobs/{running}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    # the worker drops it at its next step: a later job runs (one batch at a time)
    after = (await submit(jobs_app, "after")).json()["job_id"]
    assert (await wait_for(jobs_app, after))["status"] == "completed"
    assert 1 <= steps_run(jobs_app.model_dir) < 300
    for job_id in (queued, running):
        job = await wait_for(jobs_app, job_id)
        assert job["status"] == "cancelled" and job["result_url"] is None
        r = await jobs_app.client.get(f"/api/v1/jobs/{job_id}/result")
        assert r.status_code == 409 and r.json()["error"]["status"] == "cancelled"
    r = await jobs_app.client.delete(f"/api/v1/jobs/{after}")  # finished: unchanged
    assert r.status_code == 200 and r.json()["status"] == "completed"
    assert await jobs_app.jobs.result(running) is None


async def test_idempotent_resubmit(jobs_app: JobsApp) -> None:
    key = {"Idempotency-Key": "order-17"}
    first = await submit(jobs_app, "once", key)
    again = await submit(jobs_app, "once", key)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["job_id"] == first.json()["job_id"] == again.headers["location"].rsplit("/", 1)[1]
    r = await submit(jobs_app, "other", key)
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_conflict"
    assert "order-17" in r.json()["error"]["message"]
    r = await submit(jobs_app, "x", {"Idempotency-Key": "k" * 256})
    assert r.status_code == 422 and r.json()["error"]["field"] == "Idempotency-Key"
    assert (await jobs_app.client.get("/api/v1/jobs")).json()["total"] == 1


@pytest.mark.settings(job_max_attempts=2)
async def test_transient_failure_retried_then_failed(jobs_app: JobsApp) -> None:
    job_id = (await submit(jobs_app, "__crash__")).json()["job_id"]  # the worker dies at every run
    job = await wait_for(jobs_app, job_id)
    assert job["status"] == "failed" and job["attempts"] == 2
    assert job["error"]["code"] == "worker_crashed"
    ok = (await submit(jobs_app, "fine")).json()["job_id"]  # the next job starts a fresh worker
    assert (await wait_for(jobs_app, ok))["status"] == "completed"


async def test_permanent_failure_is_not_retried(jobs_app: JobsApp) -> None:
    job_id = (await submit(jobs_app, "__bad__")).json()["job_id"]  # refused by the pipeline itself
    job = await wait_for(jobs_app, job_id)
    assert job["status"] == "failed" and job["attempts"] == 1
    assert job["error"]["code"] == "invalid_input" and job["error"]["field"] == "$.input_data.text[0]"


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"input_data": {"text": []}}, 422, "invalid_input", "$.input_data.text"),
        ({"input_data": {"text": 5}}, 422, "invalid_input", "$.input_data.text"),
        ({"input_data": {"text": "a"}, "stream": True}, 422, "invalid_input", "$.stream"),
        ({"input_data": {"text": "a"}, "callback_url": "http://x/"}, 422, "invalid_input", "$.callback_url"),
        ({"input_data": {"text": "a"}, "version": "9.9.9"}, 404, "model_not_found", "$.version"),
        ({"input_data": {"text": "a"}, "surprise": 1}, 422, "invalid_input", None),
    ],
)
async def test_bad_input_refused_at_submit(
    jobs_app: JobsApp, body: dict[str, Any], status: int, code: str, field: str | None
) -> None:
    r = await jobs_app.client.post("/api/v1/infer/echo/async", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    if field is not None:
        assert err.get("field") == field
    assert (await jobs_app.client.get("/api/v1/jobs")).json()["total"] == 0  # nothing was stored


async def test_other_refusals(jobs_app: JobsApp) -> None:
    r = await jobs_app.client.post("/api/v1/infer/nope/async", json={"input_data": {"text": "a"}})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = await jobs_app.client.post(
        "/api/v1/infer/echo/async", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_request"
    r = await jobs_app.client.get("/api/v1/jobs?status=done")
    assert r.status_code == 422 and r.json()["error"]["field"] == "status"
    r = await jobs_app.client.get("/api/v1/jobs?limit=-1")
    assert r.status_code == 422 and r.json()["error"]["field"] == "limit"
    r = await jobs_app.client.get("/api/v1/jobs?offset=x")
    assert r.status_code == 422 and r.json()["error"]["field"] == "offset"
    assert (await jobs_app.client.get("/api/v1/jobs")).json()["total"] == 0


async def test_openapi_lists_the_jobs_endpoints(jobs_app: JobsApp) -> None:
    doc = (await jobs_app.client.get("/openapi.json")).json()
    for path in (
        "/api/v1/infer/{model_id}/async",
        "/api/v1/jobs",
        "/api/v1/jobs/{job_id}",
        "/api/v1/jobs/{job_id}/result",
    ):
        assert path in doc["paths"]
    assert {"AsyncInferRequest", "JobAccepted", "JobInfo", "JobList"} <= set(doc["components"]["schemas"])


async def test_image_job_result_is_a_result_store_url(jobs_app: JobsApp) -> None:
    body = {"input_data": {"text": "a red square"}, "parameters": {"steps": 4, "width": 16, "height": 16}}
    r = await jobs_app.client.post("/api/v1/infer/painter/async", json=body)
    assert r.status_code == 202, r.text
    job = await wait_for(jobs_app, r.json()["job_id"])
    assert job["status"] == "completed" and job["progress"] == 1.0
    result = (await jobs_app.client.get(job["result_url"])).json()
    (image,) = result["output"]["images"]
    assert image["url"].startswith("http://") and image["expires_at"] > job["finished_at"]
    png = await jobs_app.client.get(image["url"])
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


@pytest.mark.settings(job_lease_s=1.0)
async def test_a_job_longer_than_its_lease_runs_once(jobs_app: JobsApp) -> None:
    job_id = (await submit(jobs_app, "__steps__25")).json()["job_id"]  # 2.5 s of steps, leases of 1 s
    job = await wait_for(jobs_app, job_id)
    assert job["status"] == "completed" and job["attempts"] == 1  # renewed, never re-queued


async def test_job_metrics(jobs_app: JobsApp) -> None:
    job_id = (await submit(jobs_app, "counted")).json()["job_id"]
    await wait_for(jobs_app, job_id)
    text = (await jobs_app.client.get("/metrics")).text
    assert 'modelmora_jobs_total{event="submitted",model="echo"} 1.0' in text
    assert 'modelmora_jobs_total{event="completed",model="echo"} 1.0' in text
