"""Front ends, each a thin adapter over the inference core: REST now, gRPC next."""

from .rest import create_app

__all__ = ("create_app",)
