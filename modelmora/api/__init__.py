"""Public APIs: REST (Starlette) now, gRPC later."""

from .rest import create_app

__all__ = ("create_app",)
