"""Device and dtype selection for workers."""

from __future__ import annotations

from typing import Any

__all__ = ("resolve_device", "torch_dtype")


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when a GPU is usable, else "cpu"; explicit names pass through."""
    import torch

    if device in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return device


def torch_dtype(name: str) -> Any:
    """Map "float32"|"float16"|"bfloat16" to a torch dtype; "auto"/"" -> None (model default)."""
    if name in ("", "auto"):
        return None
    import torch

    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"unsupported dtype {name!r}; use one of {', '.join(table)}")
    return table[name]
