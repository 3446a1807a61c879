"""Durable async jobs: the store interface and its SQLite backend, and the runner that takes
queued jobs through the inference core."""

from .callbacks import CallbackSender, check_callback_url, sign
from .opening import JOBS_FILE, check_redis_url, open_dispatch, open_job_store, redact_url
from .record import TERMINAL, JobError, JobPage, JobRecord, JobRequest, JobStatus
from .runner import JobRunner, backoff_s, sees, stored
from .sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteJobStore
from .store import JobStore

__all__ = (
    "JOBS_FILE",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "TERMINAL",
    "CallbackSender",
    "JobError",
    "JobPage",
    "JobRecord",
    "JobRequest",
    "JobRunner",
    "JobStatus",
    "JobStore",
    "SQLiteJobStore",
    "backoff_s",
    "check_callback_url",
    "check_redis_url",
    "open_dispatch",
    "open_job_store",
    "redact_url",
    "sees",
    "sign",
    "stored",
)
