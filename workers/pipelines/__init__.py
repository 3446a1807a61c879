"""The task pipelines, one module each, loaded by name (`module:Class`) in a worker."""

__all__ = ()
