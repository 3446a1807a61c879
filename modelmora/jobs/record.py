"""What the job store keeps of one async job: its request, its state and its timestamps."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = ("TERMINAL", "JobError", "JobPage", "JobRecord", "JobRequest", "JobStatus")

JobStatus = Literal["queued", "running", "completed", "failed", "cancelled", "expired"]
"""queued -> running -> completed | failed (a transient failure goes back to queued until the
attempts run out); queued or running -> cancelled; queued -> expired (not started within `job_ttl_s`)."""

TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled", "expired"})
"""States a job never leaves (it is swept `job_ttl_s` after it reached one)."""


class JobRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The inference call a job runs: the sync envelope's fields, validated at submit."""

    input_data: dict[str, Any]
    parameters: dict[str, Any] = {}
    priority: int = 3
    timeout_seconds: float | None = None
    version: str | None = None
    return_: str = msgspec.field(default="auto", name="return")


class JobError(msgspec.Struct, frozen=True, omit_defaults=True):
    """Why a job failed (the error body's fields)."""

    code: str
    message: str
    field: str | None = None


class JobRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One job as stored. Times are Unix seconds (wall clock: they are shown to users)."""

    id: str
    model_id: str
    status: JobStatus
    request: JobRequest
    priority: int = 3
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float
    """When the store sweeps it (a queued one becomes `expired` then; a finished one is deleted)."""
    attempts: int = 0
    """Runs started so far (a run cut short by a crash or a restart counts)."""
    not_before: float = 0.0
    """A retried job waits in the queue until then."""
    progress: float | None = None
    """0..1 where the task reports steps (txt2img), 1 when completed."""
    error: JobError | None = None
    has_result: bool = False
    """The result record exists (exactly one per completed job)."""
    idempotency_key: str | None = None
    callback_url: str | None = None
    callback_state: str | None = None
    """pending (to deliver), delivered, or failed (attempts ran out); None without a callback_url."""
    callback_attempts: int = 0
    owner: str | None = None
    """The identity (token name) that submitted it: only it, or an admin, sees the job."""


class JobPage(msgspec.Struct, frozen=True):
    """One page of a job listing; `total` counts every job that matches the filters."""

    jobs: list[JobRecord]
    total: int
