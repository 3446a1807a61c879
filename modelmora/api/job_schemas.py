"""The async jobs API's JSON types (REST), and their OpenAPI paths."""

from __future__ import annotations

from typing import Any

import msgspec

from ..jobs import JobError, JobRecord, JobStatus
from .schemas import InferRequest

__all__ = ("AsyncInferRequest", "JobAccepted", "JobInfo", "JobList", "job_info", "job_paths", "job_types")


class AsyncInferRequest(InferRequest, forbid_unknown_fields=True):
    """Envelope of `POST /api/v1/infer/{model_id}/async`: the sync envelope (without `stream`)."""

    callback_url: str | None = None
    """Where to POST the job's status when it ends, signed with `callback_secret` (HMAC-SHA256 of
    `<X-ModelMora-Timestamp>.<body>` in `X-ModelMora-Signature: sha256=<hex>`); retried on failure.
    Refused when the server has no callback_secret, or for a private address unless allowed."""


class JobAccepted(msgspec.Struct):
    job_id: str
    status: JobStatus


class JobInfo(msgspec.Struct):
    """An async job: times are Unix seconds; `result_url` once completed."""

    id: str
    model_id: str
    status: JobStatus
    priority: int
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float
    attempts: int
    progress: float | None
    error: JobError | None
    result_url: str | None


class JobList(msgspec.Struct):
    jobs: list[JobInfo]
    total: int


def job_info(rec: JobRecord) -> JobInfo:
    return JobInfo(
        rec.id,
        rec.model_id,
        rec.status,
        rec.priority,
        rec.created_at,
        rec.updated_at,
        rec.started_at,
        rec.finished_at,
        rec.expires_at,
        rec.attempts,
        rec.progress,
        rec.error,
        f"/api/v1/jobs/{rec.id}/result" if rec.has_result else None,
    )


def job_types() -> list[type]:
    return [AsyncInferRequest, JobAccepted, JobInfo, JobList]


def job_paths(ref: str, error: Any, ok: Any) -> dict[str, Any]:
    """The jobs endpoints' OpenAPI paths (`ref`: the schema reference template; `error`, `ok`: the
    document's response builders)."""
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
    model_id = {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
    unknown = error("Unknown job (never submitted, or swept after job_ttl_s)")
    page = [
        {"name": "model", "in": "query", "required": False, "schema": {"type": "string"}},
        {
            "name": "status",
            "in": "query",
            "required": False,
            "schema": {"enum": ["queued", "running", "completed", "failed", "cancelled", "expired"]},
        },
        {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "default": 100}},
        {"name": "offset", "in": "query", "required": False, "schema": {"type": "integer", "default": 0}},
    ]
    return {
        "/api/v1/infer/{model_id}/async": {
            "post": {
                "summary": "Submit an async job: validated like the sync call, stored, then run in the background",
                "operationId": "inferAsync",
                "parameters": [
                    model_id,
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "A retried submit with the same key (and request) returns the same job",
                        "schema": {"type": "string", "maxLength": 255},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": ref.format(name="AsyncInferRequest")}}},
                },
                "responses": {
                    "202": ok("JobAccepted", "Stored (Location: the job); 200 when the Idempotency-Key named it"),
                    "400": error("Malformed JSON"),
                    "404": error("Unknown model or version"),
                    "409": error("The Idempotency-Key names another request (idempotency_conflict)"),
                    "413": error("Body over max_body_bytes"),
                    "415": error("Content-Type is not application/json"),
                    "422": error("Invalid field; error.field names it"),
                    "503": error("The job store cannot be written (storage_unavailable)"),
                },
            }
        },
        "/api/v1/jobs": {
            "get": {
                "summary": "Async jobs, newest first; filters model and status; limit and offset page",
                "operationId": "listJobs",
                "parameters": page,
                "responses": {"200": ok("JobList"), "422": error("Invalid filter or page")},
            }
        },
        "/api/v1/jobs/{job_id}": {
            "get": {
                "summary": "An async job: status, timestamps, attempts, progress, error",
                "operationId": "getJob",
                "parameters": [job_id],
                "responses": {"200": ok("JobInfo"), "404": unknown},
            },
            "delete": {
                "summary": "Cancel a queued or running job (a running one stops in its worker); a finished one"
                " is returned unchanged",
                "operationId": "cancelJob",
                "parameters": [job_id],
                "responses": {"200": ok("JobInfo"), "404": unknown},
            },
        },
        "/api/v1/jobs/{job_id}/result": {
            "get": {
                "summary": "A completed job's result: the sync call's response body",
                "operationId": "getJobResult",
                "parameters": [job_id],
                "responses": {
                    "200": ok("InferResponse"),
                    "404": unknown,
                    "409": error("Not completed: error.status is the job's status (job_not_finished)"),
                },
            }
        },
    }
