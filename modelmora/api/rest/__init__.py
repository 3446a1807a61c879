"""The native REST front end (Starlette on Hypercorn; the hot path straight from ASGI)."""

from .app import create_app
from .jobs import job_result_body, job_routes

__all__ = ("create_app", "job_result_body", "job_routes")
