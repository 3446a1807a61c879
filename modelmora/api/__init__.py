"""Front ends, each a thin adapter over the inference core: REST now, gRPC next."""

from .rest import create_app, job_result_body, job_routes

__all__ = ("create_app", "job_result_body", "job_routes")
