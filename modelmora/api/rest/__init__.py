"""The native REST front end (Starlette on Hypercorn; the hot path straight from ASGI)."""

from .app import create_app

__all__ = ("create_app",)
