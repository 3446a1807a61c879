"""Device and dtype selection for workers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

__all__ = ("for_inference", "load_kwargs", "resolve_device", "torch_dtype")

M = TypeVar("M", bound="torch.nn.Module")


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when a GPU is usable, else "cpu"; explicit names pass through."""
    import torch

    if device in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return device


def torch_dtype(name: str) -> torch.dtype | None:
    """Map "float32"|"float16"|"bfloat16" to a torch dtype; "auto"/"" -> None (model default)."""
    if name in ("", "auto"):
        return None
    import torch

    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"unsupported dtype {name!r}; use one of {', '.join(table)}")
    return table[name]


def load_kwargs(dtype: str, *, dtype_key: str = "dtype") -> dict[str, Any]:
    """`from_pretrained` keyword arguments: offline, and the dtype when one is asked for
    (`dtype_key`: "dtype" for transformers, "torch_dtype" for diffusers)."""
    kwargs: dict[str, Any] = {"local_files_only": True}
    td = torch_dtype(dtype)
    if td is not None:
        kwargs[dtype_key] = td
    return kwargs


def for_inference(model: M, device: str) -> M:
    """`model` moved to `device` and in eval mode (both in place), with its own type kept
    (transformers wraps `PreTrainedModel.to` with `functools.wraps`, which hides its type)."""
    model.to(device)
    model.eval()
    return model
