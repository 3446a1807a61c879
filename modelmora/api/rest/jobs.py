"""REST endpoints of async jobs: submit (`POST /api/v1/infer/{model_id}/async`), look up, list,
fetch the result, cancel. Thin: the runner (`modelmora.jobs.JobRunner`) does the work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Scope

from ...errors import InvalidInput, JobNotFinished, JobNotFound
from ...jobs import JobRecord, JobRequest, JobRunner, JobStatus, stored
from ...observability import incoming
from ...results import absolute_url
from ...security import ANONYMOUS, Identity
from ...service import InferResult, Priority
from ..job_schemas import AsyncInferRequest, JobAccepted, JobList, job_info
from .body import decode, read_body
from .encode import response_body
from .errors import json_response

__all__ = ("job_result_body", "job_routes")

MAX_JOB_PAGE = 1000
"""`GET /api/v1/jobs?limit=` at most."""
MAX_IDEMPOTENCY_KEY = 255
_STATUSES = ("queued", "running", "completed", "failed", "cancelled", "expired")
_decoder = msgspec.json.Decoder(AsyncInferRequest)
_body_decoder = msgspec.json.Decoder(dict[str, Any])
_encoder = msgspec.json.Encoder()
_IDENTITY_KEY = "modelmora.identity"
"""Where the gate leaves the caller's `Identity` in the ASGI scope (the REST app's key)."""


def _identity(request: HTTPRequest) -> Identity:
    """The caller, as the gate admitted it (`ANONYMOUS` while authentication is off)."""
    identity: Identity = request.scope.get(_IDENTITY_KEY, ANONYMOUS)
    return identity


def job_result_body(result: InferResult, request: JobRequest) -> bytes:
    """A finished job's result record: the sync call's response body (result URLs kept relative)."""
    return _encoder.encode(response_body(result, str(request.parameters.get("encoding", "float")), ""))


def _absolute(body: bytes, base_url: str) -> bytes:
    """The stored body with its result URLs (images) made absolute for this request."""
    if b'"url"' not in body:
        return body
    doc = _body_decoder.decode(body)
    for image in doc.get("output", {}).get("images", []):
        if isinstance(image, dict) and isinstance(image.get("url"), str):
            image["url"] = absolute_url(image["url"], base_url)
    return _encoder.encode(doc)


def _page_arg(request: HTTPRequest, name: str, default: int, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > maximum:
        raise InvalidInput(f"{name} must be an integer from 0 to {maximum} (got {raw!r})", field=name)
    return int(raw)


def job_routes(
    runner: JobRunner, limit: int, body_timeout_s: float, public_url: str, base_url: Callable[[Scope], str]
) -> list[Route]:
    """The jobs endpoints over `runner` (`limit`, `body_timeout_s`: the request body's bounds;
    `public_url`: the base of result URLs, else `base_url(scope)`, this server's as the connection
    reached it)."""

    async def job(job_id: str, identity: Identity) -> JobRecord:
        rec = await runner.find(job_id, identity)  # another identity's job: 404, as an unknown one
        if rec is None:
            raise JobNotFound(f"job {job_id!r} does not exist (or was swept after job_ttl_s)")
        return rec

    async def submit(request: HTTPRequest) -> Response:
        model_id = request.path_params["model_id"]
        env = decode(_decoder, await read_body(request.scope, request.receive, limit, body_timeout_s))
        if env.stream:
            raise InvalidInput("an async job cannot stream: poll the job, then fetch its result", field="$.stream")
        key = request.headers.get("idempotency-key")
        if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
            raise InvalidInput(
                f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters", field="Idempotency-Key"
            )
        priority = Priority.parse(int(env.priority) if isinstance(env.priority, float) else env.priority)
        job_request = JobRequest(
            env.input_data, env.parameters, int(priority), env.timeout_seconds, env.version, env.return_
        )
        trace = incoming(request.headers.get("traceparent"), request.headers.get("tracestate"))
        rec, created = await runner.submit(
            model_id,
            job_request,
            protocol="rest",
            idempotency_key=key,
            callback_url=env.callback_url,
            trace=trace,
            identity=_identity(request),
        )
        headers = {"Location": f"/api/v1/jobs/{rec.id}"}
        return json_response(JobAccepted(rec.id, rec.status), 202 if created else 200, headers)

    async def get_job(request: HTTPRequest) -> Response:
        job_id = request.path_params["job_id"]
        if request.method == "DELETE":
            rec = await runner.cancel(job_id, _identity(request))
            if rec is None:
                raise JobNotFound(f"job {job_id!r} does not exist (or was swept after job_ttl_s)")
            return json_response(job_info(rec))
        return json_response(job_info(await job(job_id, _identity(request))))

    async def result(request: HTTPRequest) -> Response:
        job_id = request.path_params["job_id"]
        rec = await job(job_id, _identity(request))
        body = await stored(runner.store.result(job_id)) if rec.status == "completed" else None
        if body is None:
            raise JobNotFinished(f"job {job_id!r} is {rec.status}: it has no result", status=rec.status)
        return Response(_absolute(body, public_url or base_url(request.scope)), media_type="application/json")

    async def list_jobs(request: HTTPRequest) -> Response:
        status = request.query_params.get("status")
        if status is not None and status not in _STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(_STATUSES)} (got {status!r})", field="status")
        page = await stored(
            runner.store.list(
                model_id=request.query_params.get("model"),
                status=_status(status),
                limit=_page_arg(request, "limit", 100, MAX_JOB_PAGE),
                offset=_page_arg(request, "offset", 0, 2**31),
                owner=runner.owner_filter(_identity(request)),
            )
        )
        return json_response(JobList([job_info(r) for r in page.jobs], page.total))

    return [
        Route("/api/v1/infer/{model_id}/async", submit, methods=["POST"]),
        Route("/api/v1/jobs", list_jobs, methods=["GET"]),
        Route("/api/v1/jobs/{job_id}", get_job, methods=["GET", "DELETE"]),
        Route("/api/v1/jobs/{job_id}/result", result, methods=["GET"]),
    ]


def _status(value: str | None) -> JobStatus | None:
    return value  # type: ignore[return-value]  # checked against _STATUSES
