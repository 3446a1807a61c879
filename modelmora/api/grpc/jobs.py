"""The JobService servicer: durable async jobs over the job runner (`modelmora.jobs`).

InferAsync validates the request message as Infer does, then stores it as the same job REST's
`POST /api/v1/infer/{id}/async` would (images as base64 or URLs); GetJobResult answers a completed
job's stored result (whichever front end submitted it) as an InferResponse.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import anyio
import betterproto2
import msgspec
import numpy as np
from grpclib.const import Cardinality, Handler
from grpclib.server import Stream

from ..._proto.modelmora import v1
from ...errors import InvalidInput, JobNotFinished, JobNotFound
from ...jobs import TERMINAL, JobRecord, JobRequest, JobRunner, stored
from ...results import absolute_url
from ...security import Identity
from .calls import Calls
from .decode import decode_call, parameters_name
from .encode import task_type

__all__ = ("WATCH_POLL_S", "JobServicer", "job_message", "job_request", "stored_response")

_PATH = "/modelmora.v1.JobService/"
WATCH_POLL_S = 0.2
"""How often WatchJob looks at the job's record for a change."""
_RETURN = {0: "auto", 1: "inline", 2: "url"}
_FINISH = {"stop": v1.FinishReason.STOP, "length": v1.FinishReason.LENGTH}
_decoder = msgspec.json.Decoder(dict[str, Any])


def job_request(req: v1.InferRequest) -> JobRequest:
    """The job an InferRequest message makes (validated by `decode_call` first).

    Raises:
        InvalidInput: a raw image (InferAsync takes encoded images or URLs).
    """
    if req.images:
        images: list[str] = []
        for i, image in enumerate(req.images):
            name, value = betterproto2.which_one_of(image, "source")
            if name == "encoded" and value is not None:
                images.append(base64.b64encode(bytes(value)).decode("ascii"))
            elif name == "url":
                images.append(str(value))
            else:
                raise InvalidInput(
                    "InferAsync takes encoded images or URLs, not raw pixels", field=f"$.input_data.image[{i}]"
                )
        input_data: dict[str, Any] = {"image": images}
    else:
        input_data = {"text": list(req.texts)}
    parameters: dict[str, Any] = {}
    name, message = betterproto2.which_one_of(req, "parameters")
    if name and message is not None:
        for f in dataclasses.fields(message):
            value = getattr(message, f.name)
            if value is not None and value != []:
                parameters[f.name] = list(value) if isinstance(value, list) else value
    return JobRequest(
        input_data,
        parameters,
        int(req.priority) or 3,
        req.timeout_seconds,
        req.version or None,
        _RETURN.get(int(req.return_mode), "auto"),
    )


def job_message(rec: JobRecord) -> v1.Job:
    error = rec.error
    return v1.Job(
        job_id=rec.id,
        model_id=rec.model_id,
        status=v1.JobStatus[rec.status.upper()],
        priority=v1.Priority(rec.priority),
        created_at=rec.created_at,
        updated_at=rec.updated_at,
        started_at=rec.started_at,
        finished_at=rec.finished_at,
        expires_at=rec.expires_at,
        attempts=rec.attempts,
        progress=rec.progress,
        error=None if error is None else v1.Error(code=error.code, message=error.message, field=error.field or ""),
        has_result=rec.has_result,
    )


def stored_response(body: bytes, base_url: str) -> v1.InferResponse:
    """A stored result (the REST response body) as an InferResponse."""
    doc = _decoder.decode(body)
    out = doc["output"]
    t = doc["timing"]
    output: dict[str, Any]
    if "embeddings" in out:
        rows = out["embeddings"]
        if rows and isinstance(rows[0], str):
            data = b"".join(base64.b64decode(r) for r in rows)
            arr = np.frombuffer(data, "<f4").reshape(len(rows), -1)
        else:
            arr = np.asarray(rows, dtype="<f4").reshape(len(rows), -1)
        output = {"embeddings": v1.Embeddings(data=arr.tobytes(), shape=list(arr.shape))}
    elif "texts" in out:
        reasons = [_FINISH.get(r, v1.FinishReason.UNSPECIFIED) for r in out.get("finish_reasons", [])]
        output = {"texts": v1.Texts(texts=list(out["texts"]), finish_reasons=reasons)}
    else:
        images = [
            v1.GeneratedImage(png=base64.b64decode(i["b64_png"]))
            if i.get("b64_png")
            else v1.GeneratedImage(url=absolute_url(i["url"], base_url), expires_at=i.get("expires_at"))
            for i in out["images"]
        ]
        output = {"images": v1.GeneratedImages(images=images)}
    return v1.InferResponse(
        model_id=doc["model_id"],
        version=doc["version"],
        task_type=task_type(doc["task_type"]),
        timing=v1.Timing(queue_ms=t["queue_ms"], inference_ms=t["inference_ms"], total_ms=t["total_ms"]),
        **output,
    )


class JobServicer:
    """`modelmora.v1.JobService` over the job runner; `base_url` makes stored result URLs absolute."""

    def __init__(self, runner: JobRunner, calls: Calls, base_url: str) -> None:
        self.runner = runner
        self.calls = calls
        self.base_url = base_url

    def __mapping__(self) -> dict[str, Handler]:
        return {
            _PATH + "InferAsync": Handler(
                self.infer_async, Cardinality.UNARY_UNARY, v1.InferAsyncRequest, v1.JobReference
            ),
            _PATH + "GetJob": Handler(self.get_job, Cardinality.UNARY_UNARY, v1.JobId, v1.Job),
            _PATH + "CancelJob": Handler(self.cancel_job, Cardinality.UNARY_UNARY, v1.JobId, v1.Job),
            _PATH + "WatchJob": Handler(self.watch_job, Cardinality.UNARY_STREAM, v1.JobId, v1.Job),
            _PATH + "GetJobResult": Handler(self.get_result, Cardinality.UNARY_UNARY, v1.JobId, v1.InferResponse),
        }

    async def _job(self, job_id: str, identity: Identity) -> JobRecord:
        rec = await self.runner.find(job_id, identity)  # another identity's job: NOT_FOUND, as an unknown one
        if rec is None:
            raise JobNotFound(f"job {job_id!r} does not exist (or was swept after job_ttl_s)", field="job_id")
        return rec

    async def infer_async(self, stream: Stream[v1.InferAsyncRequest, v1.JobReference]) -> None:
        async with self.calls.guard(stream, "InferAsync") as context:  # type: ignore[arg-type]
            msg = await stream.recv_message()
            assert msg is not None
            req = msg.request or v1.InferRequest()
            context.parameters = parameters_name(req)
            call = decode_call(req, None, trace=context.trace)  # validates the fields as Infer does
            key = msg.idempotency_key or None
            if key is not None and len(key) > 255:
                raise InvalidInput("idempotency_key must be at most 255 characters", field="idempotency_key")
            rec, created = await self.runner.submit(
                call.model_id,
                job_request(req),
                protocol="grpc",
                idempotency_key=key,
                callback_url=msg.callback_url or None,
                trace=call.trace,
                identity=context.identity,
            )
            await stream.send_message(
                v1.JobReference(job_id=rec.id, status=v1.JobStatus[rec.status.upper()], created=created)
            )

    async def get_job(self, stream: Stream[v1.JobId, v1.Job]) -> None:
        async with self.calls.guard(stream, "GetJob") as context:  # type: ignore[arg-type]
            msg = await stream.recv_message()
            assert msg is not None
            await stream.send_message(job_message(await self._job(msg.job_id, context.identity)))

    async def cancel_job(self, stream: Stream[v1.JobId, v1.Job]) -> None:
        async with self.calls.guard(stream, "CancelJob") as context:  # type: ignore[arg-type]
            msg = await stream.recv_message()
            assert msg is not None
            rec = await self.runner.cancel(msg.job_id, context.identity)
            if rec is None:
                raise JobNotFound(f"job {msg.job_id!r} does not exist (or was swept after job_ttl_s)", field="job_id")
            await stream.send_message(job_message(rec))

    async def watch_job(self, stream: Stream[v1.JobId, v1.Job]) -> None:
        async with self.calls.guard(stream, "WatchJob") as context:  # type: ignore[arg-type]
            msg = await stream.recv_message()
            assert msg is not None
            rec = await self._job(msg.job_id, context.identity)
            seen = None
            while True:
                state = (rec.status, rec.attempts, rec.progress)
                if state != seen:
                    await stream.send_message(job_message(rec))
                    seen = state
                if rec.status in TERMINAL:
                    return
                await anyio.sleep(WATCH_POLL_S)
                rec = await self._job(msg.job_id, context.identity)

    async def get_result(self, stream: Stream[v1.JobId, v1.InferResponse]) -> None:
        async with self.calls.guard(stream, "GetJobResult") as context:  # type: ignore[arg-type]
            msg = await stream.recv_message()
            assert msg is not None
            rec = await self._job(msg.job_id, context.identity)
            body = await stored(self.runner.store.result(rec.id)) if rec.status == "completed" else None
            if body is None:
                raise JobNotFinished(f"job {rec.id!r} is {rec.status}: it has no result", status=rec.status)
            await stream.send_message(stored_response(body, self.base_url))
