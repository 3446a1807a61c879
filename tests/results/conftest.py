"""Fixtures of the result store tests."""

from s3server import seaweed

__all__ = ("seaweed",)
