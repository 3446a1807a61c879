# ruff: noqa: ASYNC109  (`timeout` is the call's gRPC deadline, the name grpclib and grpcio use)
"""Async jobs in the client: `submit` a request, then `wait` for it (polling at an interval that
grows up to a cap), `watch` its changes as the server streams them, `job`, `cancel`, and
`job_result` (the same result types as the direct calls).

`submit` is safe to retry: it sends an idempotency key (a new one per call unless given), so an
UNAVAILABLE answer is retried without ever creating a second job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.metadata import Deadline

from .._proto.modelmora import v1
from . import _requests as req
from ._calls import ClientCalls
from ._convert import error_for, from_exception, infer_result
from ._requests import ImageInput, PriorityName, ReturnMode
from .results import ImageResult, ModelInfo, TextResult

__all__ = ("FINAL_STATUSES", "Job", "JobMethods")

T = TypeVar("T")

FINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "expired"})
_PARAMETERS: dict[str, tuple[str, type[Any]]] = {
    "txt2embed": ("embedding", v1.EmbeddingParameters),
    "img2embed": ("embedding", v1.EmbeddingParameters),
    "txt2txt": ("generation", v1.GenerationParameters),
    "img2txt": ("caption", v1.CaptionParameters),
    "txt2img": ("image_generation", v1.ImageGenerationParameters),
}


@dataclass(frozen=True, slots=True)
class Job:
    """An async job as the server last reported it (times are Unix seconds)."""

    id: str
    model_id: str
    status: str
    """queued, running, completed, failed, cancelled or expired."""
    priority: int
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float
    attempts: int
    progress: float | None
    error_code: str | None
    error_message: str | None
    has_result: bool

    @property
    def done(self) -> bool:
        """The job reached a final status."""
        return self.status in FINAL_STATUSES


def _job(message: v1.Job) -> Job:
    status = v1.JobStatus(message.status).name.lower()
    error = message.error
    return Job(
        message.job_id,
        message.model_id,
        status,
        int(message.priority) or 3,
        message.created_at,
        message.updated_at,
        message.started_at,
        message.finished_at,
        message.expires_at,
        message.attempts,
        message.progress,
        error.code if error is not None else None,
        error.message if error is not None else None,
        message.has_result,
    )


def _job_id(job: Job | str) -> str:
    return job.id if isinstance(job, Job) else job


class JobMethods(ClientCalls):
    """The job calls of `AsyncClient` (its base)."""

    if TYPE_CHECKING:

        async def model(
            self, model_id: str, *, timeout: float | None = None, metadata: Mapping[str, str] | None = None
        ) -> ModelInfo: ...

    async def submit(
        self,
        model: str,
        texts: str | Sequence[str] | None = None,
        *,
        images: ImageInput | Sequence[ImageInput] | None = None,
        parameters: Mapping[str, Any] | None = None,
        version: str | None = None,
        priority: int | PriorityName | None = None,
        return_mode: ReturnMode = "auto",
        timeout_seconds: float | None = None,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Job:
        """Submit an async job: `texts` or `images` (encoded files, URLs, arrays, PIL images) for
        `model`, with the task's `parameters` (those of `embed`, `generate`, `caption` or
        `generate_image`); `timeout_seconds` bounds each run of the job on the server;
        `callback_url` is POSTed the job's status when it ends. Returns once the server has stored
        the job."""
        if (texts is None) == (images is None):
            raise req.refuse("give texts or images (one of them)", "texts")
        request = v1.InferRequest(
            model_id=model,
            version=version or "",
            texts=req.texts(texts) if texts is not None else [],
            images=req.images(images) if images is not None else [],
            priority=req.priority(priority),
            timeout_seconds=timeout_seconds,
            return_mode=req.return_mode(return_mode),
        )
        if parameters:
            task = (await self.model(model, timeout=timeout, metadata=metadata)).task_type
            field, message = _PARAMETERS.get(task, (None, None))
            if field is None or message is None:
                raise req.refuse(f"model {model!r} has task type {task!r}, which takes no parameters", "parameters")
            try:
                setattr(request, field, message(**parameters))
            except TypeError:
                known = ", ".join(f.name for f in dataclasses.fields(message))
                raise req.refuse(
                    f"{task} takes the parameters {known} (got {sorted(parameters)})", "parameters"
                ) from None
        key = idempotency_key or uuid.uuid4().hex
        submit = v1.InferAsyncRequest(request=request, idempotency_key=key, callback_url=callback_url or "")

        async def call(channel: Channel, deadline: Deadline | None, md: dict[str, str] | None) -> v1.JobReference:
            return await v1.JobServiceStub(channel).infer_async(submit, deadline=deadline, metadata=md)

        ref = await self._unary("InferAsync", call, idempotent=True, timeout=timeout, metadata=metadata)
        return await self.job(ref.job_id, timeout=timeout, metadata=metadata)

    async def job(
        self, job: Job | str, *, timeout: float | None = None, metadata: Mapping[str, str] | None = None
    ) -> Job:
        """The job now."""
        request = v1.JobId(job_id=_job_id(job))

        async def call(channel: Channel, deadline: Deadline | None, md: dict[str, str] | None) -> v1.Job:
            return await v1.JobServiceStub(channel).get_job(request, deadline=deadline, metadata=md)

        return _job(await self._unary("GetJob", call, idempotent=True, timeout=timeout, metadata=metadata))

    async def cancel(
        self, job: Job | str, *, timeout: float | None = None, metadata: Mapping[str, str] | None = None
    ) -> Job:
        """Cancel a queued or running job (a finished one is returned unchanged)."""
        request = v1.JobId(job_id=_job_id(job))

        async def call(channel: Channel, deadline: Deadline | None, md: dict[str, str] | None) -> v1.Job:
            return await v1.JobServiceStub(channel).cancel_job(request, deadline=deadline, metadata=md)

        return _job(await self._unary("CancelJob", call, idempotent=True, timeout=timeout, metadata=metadata))

    async def wait(
        self,
        job: Job | str,
        *,
        poll_interval: float = 0.5,
        max_poll_interval: float = 5.0,
        backoff: float = 1.5,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Job:
        """Poll until the job reaches a final status and return it: the first poll after
        `poll_interval` seconds, each later one `backoff` times longer, at most `max_poll_interval`.

        Raises:
            DeadlineExceededError: `timeout` seconds passed first (the job goes on on the server).
        """
        if not poll_interval > 0 or max_poll_interval < poll_interval or backoff < 1:
            raise req.refuse("need 0 < poll_interval <= max_poll_interval and backoff >= 1", "poll_interval")
        end = None if timeout is None else time.monotonic() + timeout
        current = job if isinstance(job, Job) else await self.job(job, metadata=metadata)
        delay = poll_interval
        while not current.done:
            if end is not None and time.monotonic() + delay > end:
                remaining = end - time.monotonic()
                if remaining > 0:
                    await asyncio.sleep(remaining)
                    current = await self.job(current.id, metadata=metadata)
                    if current.done:
                        break
                raise error_for(
                    Status.DEADLINE_EXCEEDED, f"job {current.id} is still {current.status} after {timeout} s"
                )
            await asyncio.sleep(delay)
            delay = min(delay * backoff, max_poll_interval)
            current = await self.job(current.id, metadata=metadata)
        return current

    async def watch(
        self, job: Job | str, *, timeout: float | None = None, metadata: Mapping[str, str] | None = None
    ) -> AsyncIterator[Job]:
        """The job now, then each change of its status, attempts or progress, until a final status."""
        deadline, md = self._options(timeout, metadata)
        stub = v1.JobServiceStub(self._get_channel())
        updates = cast(
            AsyncGenerator[v1.Job], stub.watch_job(v1.JobId(job_id=_job_id(job)), deadline=deadline, metadata=md)
        )
        try:
            async for message in updates:
                yield _job(message)
        except Exception as exc:
            error = from_exception(exc, None, 1)
            if error is None or error is exc:
                raise
            raise error from exc
        finally:
            await updates.aclose()

    async def job_result(
        self, job: Job | str, *, timeout: float | None = None, metadata: Mapping[str, str] | None = None
    ) -> np.ndarray | TextResult | ImageResult:
        """A completed job's result, as the direct call answers it: embeddings (a float32 array),
        texts (`TextResult`) or images (`ImageResult`).

        Raises:
            ClientError: FAILED_PRECONDITION (`job_not_finished`) while the job is not completed.
        """
        request = v1.JobId(job_id=_job_id(job))

        async def call(channel: Channel, deadline: Deadline | None, md: dict[str, str] | None) -> v1.InferResponse:
            return await v1.JobServiceStub(channel).get_job_result(request, deadline=deadline, metadata=md)

        return infer_result(
            await self._unary("GetJobResult", call, idempotent=True, timeout=timeout, metadata=metadata)
        )
