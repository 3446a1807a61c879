"""Kept for existing imports: the logging set-up lives in `modelmora.observability.logs`."""

from .observability.logs import configure_logging

__all__ = ("configure_logging",)
