"""Front ends, each a thin adapter over the inference core: native REST, gRPC, and the drop-in
protocols (OpenAI, Open Inference Protocol)."""

from .rest import create_app, job_result_body, job_routes

__all__ = ("create_app", "job_result_body", "job_routes")
