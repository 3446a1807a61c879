"""gRPC JobService against `mm serve` (Echo pipeline): InferAsync, GetJob, WatchJob, CancelJob,
GetJobResult, idempotency keys, refusals; a job submitted over REST answered over gRPC."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from modelmora._proto.modelmora import v1
from modelmora.client import (
    AsyncClient,
    Client,
    ClientError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
)

from conftest import ECHO_LAYOUT, TESTS_DIR
from serverproc import ServerProcess, mm

pytestmark = [pytest.mark.slow, pytest.mark.anyio]  # a real server process

DONE = {v1.JobStatus.COMPLETED, v1.JobStatus.FAILED, v1.JobStatus.CANCELLED, v1.JobStatus.EXPIRED}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    src = tmp_path_factory.mktemp("echo-src")
    (src / "weights.bin").write_bytes(b"\0" * 16)
    for name in ECHO_LAYOUT:
        (src / name).write_text("{}")
    home = tmp_path_factory.mktemp("grpc-jobs-home")
    mm("install", str(src), "--id", "echo", "--task", "txt2embed", home=home)
    env = {
        "MODELMORA_PIPELINES__TXT2EMBED": "worker_pipelines:Echo",
        "MODELMORA_ZYGOTE_PRELOAD": "numpy",
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p),
    }
    srv = ServerProcess(home, env).start()
    try:
        yield srv
    finally:
        assert srv.stop() == 0


def _request(*texts: str, **kw: object) -> v1.InferRequest:
    return v1.InferRequest(model_id="echo", texts=list(texts), **kw)  # type: ignore[arg-type]


async def _watch(stub: v1.JobServiceStub, job_id: str) -> list[v1.Job]:
    return [job async for job in stub.watch_job(v1.JobId(job_id=job_id))]


async def test_submit_watch_and_result(channel: Channel) -> None:
    stub = v1.JobServiceStub(channel)
    ref = await stub.infer_async(v1.InferAsyncRequest(request=_request("abc", "de", priority=v1.Priority.HIGH)))
    assert ref.created and ref.job_id and ref.status in (v1.JobStatus.QUEUED, v1.JobStatus.RUNNING)
    seen = await _watch(stub, ref.job_id)
    assert seen[-1].status == v1.JobStatus.COMPLETED and seen[-1].has_result and seen[-1].attempts == 1
    assert all(job.status not in DONE for job in seen[:-1])
    job = await stub.get_job(v1.JobId(job_id=ref.job_id))
    assert job.priority == v1.Priority.HIGH and job.model_id == "echo" and job.progress == 1.0
    result = await stub.get_job_result(v1.JobId(job_id=ref.job_id))
    assert result.embeddings is not None and list(result.embeddings.shape) == [2, 4]
    rows = np.frombuffer(result.embeddings.data, "<f4").reshape(2, 4)
    assert rows[:, :2].tolist() == [[3.0, 294.0], [2.0, 201.0]]
    assert result.task_type == v1.TaskType.TXT2EMBED


async def test_idempotency_key(channel: Channel) -> None:
    stub = v1.JobServiceStub(channel)
    first = await stub.infer_async(v1.InferAsyncRequest(request=_request("x"), idempotency_key="grpc-1"))
    again = await stub.infer_async(v1.InferAsyncRequest(request=_request("x"), idempotency_key="grpc-1"))
    assert first.created and not again.created and again.job_id == first.job_id
    with pytest.raises(GRPCError) as err:
        await stub.infer_async(v1.InferAsyncRequest(request=_request("y"), idempotency_key="grpc-1"))
    assert err.value.status == Status.FAILED_PRECONDITION and "grpc-1" in (err.value.message or "")


async def test_cancel_running_and_unfinished_result(channel: Channel) -> None:
    stub = v1.JobServiceStub(channel)
    ref = await stub.infer_async(v1.InferAsyncRequest(request=_request("__steps__300")))  # 30 s
    async for job in stub.watch_job(v1.JobId(job_id=ref.job_id)):
        if job.status == v1.JobStatus.RUNNING:
            break
    with pytest.raises(GRPCError) as err:
        await stub.get_job_result(v1.JobId(job_id=ref.job_id))
    assert err.value.status == Status.FAILED_PRECONDITION and "running" in (err.value.message or "")
    cancelled = await stub.cancel_job(v1.JobId(job_id=ref.job_id))
    assert cancelled.status == v1.JobStatus.CANCELLED and not cancelled.has_result
    assert [j.status for j in await _watch(stub, ref.job_id)] == [v1.JobStatus.CANCELLED]


async def test_refusals(channel: Channel) -> None:
    stub = v1.JobServiceStub(channel)
    for call in (stub.get_job, stub.cancel_job, stub.get_job_result):
        with pytest.raises(GRPCError) as err:
            await call(v1.JobId(job_id="nope"))
        assert err.value.status == Status.NOT_FOUND and "nope" in (err.value.message or "")
    with pytest.raises(GRPCError) as err:
        await _watch(stub, "nope")
    assert err.value.status == Status.NOT_FOUND
    with pytest.raises(GRPCError) as err:
        await stub.infer_async(v1.InferAsyncRequest(request=_request()))
    assert err.value.status == Status.INVALID_ARGUMENT and (err.value.message or "").startswith("texts")
    raw = v1.Image(raw=v1.RawImage(rgb=b"\0" * 12, height=2, width=2))
    with pytest.raises(GRPCError) as err:
        await stub.infer_async(v1.InferAsyncRequest(request=v1.InferRequest(model_id="echo", images=[raw])))
    assert err.value.status == Status.INVALID_ARGUMENT and (err.value.message or "").startswith("images[0]")
    with pytest.raises(GRPCError) as err:
        await stub.infer_async(v1.InferAsyncRequest(request=v1.InferRequest(model_id="nope", texts=["a"])))
    assert err.value.status == Status.NOT_FOUND
    with pytest.raises(GRPCError) as err:  # this server has no callback_secret
        await stub.infer_async(v1.InferAsyncRequest(request=_request("a"), callback_url="http://example.com/"))
    assert err.value.status == Status.INVALID_ARGUMENT and "callback_secret" in (err.value.message or "")


async def test_a_rest_job_answered_over_grpc(server: ServerProcess, channel: Channel) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        body = {"input_data": {"text": ["ab"]}, "parameters": {"encoding": "base64"}}
        r = await client.post("/api/v1/infer/echo/async", json=body)
    assert r.status_code == 202, r.text
    stub = v1.JobServiceStub(channel)
    assert (await _watch(stub, r.json()["job_id"]))[-1].status == v1.JobStatus.COMPLETED
    result = await stub.get_job_result(v1.JobId(job_id=r.json()["job_id"]))
    assert result.embeddings is not None
    assert np.frombuffer(result.embeddings.data, "<f4").tolist()[:2] == [2.0, 195.0]


async def test_client_submit_wait_watch_cancel(server: ServerProcess) -> None:
    async with AsyncClient(f"127.0.0.1:{server.grpc_port}") as client:
        job = await client.submit("echo", ["abc"], parameters={"normalize": False}, priority="high")
        assert job.model_id == "echo" and job.priority == 2 and not job.done
        done = await client.wait(job, poll_interval=0.01, max_poll_interval=0.05)
        assert done.status == "completed" and done.has_result and done.done
        vectors = await client.job_result(done)
        assert isinstance(vectors, np.ndarray) and vectors.shape == (1, 4) and vectors[0, 0] == 3.0
        long = await client.submit("echo", "__steps__300")
        with pytest.raises(DeadlineExceededError, match=long.id):
            await client.wait(long, poll_interval=0.01, timeout=0.05)
        with pytest.raises(ClientError) as err:
            await client.job_result(long)
        assert err.value.status == Status.FAILED_PRECONDITION and err.value.code == "job_not_finished"
        cancelled = await client.cancel(long)
        assert cancelled.status == "cancelled"
        assert [j.status async for j in client.watch(long.id)] == ["cancelled"]
        with pytest.raises(InvalidArgumentError, match="normalize"):
            await client.submit("echo", "a", parameters={"bogus": 1})
        with pytest.raises(NotFoundError):
            await client.job("nope")


def test_blocking_client_jobs(server: ServerProcess) -> None:
    with Client(f"127.0.0.1:{server.grpc_port}") as client:
        job = client.submit("echo", ["hello"], idempotency_key="blocking-1")
        assert client.submit("echo", ["hello"], idempotency_key="blocking-1").id == job.id
        statuses = [j.status for j in client.watch(job)]
        assert statuses[-1] == "completed"
        assert client.wait(job.id).status == "completed"
        vectors = client.job_result(job)
        assert isinstance(vectors, np.ndarray) and vectors[0, 0] == 5.0
