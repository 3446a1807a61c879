"""ModelMora: a multi-model inference server (the supervisor process; it never imports torch)."""

__all__ = ("__version__",)

__version__ = "0.1.0"
