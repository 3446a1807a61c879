"""The payload codec without numpy: batch inputs to ring bytes and descriptors, outputs back.

The supervisor holds no numpy: an array travels as `TensorData` (dtype string, shape, bytes).
`pack` turns one input list into the chunks to place in a ring (or a large segment) and a
function that builds its descriptor once the span is known; `unpack` turns an output's
descriptor and bytes back into Python values. The worker's mirror, with numpy views over the
same spans, is `modelmora_workers.payloads`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from . import messages as m
from .control import ProtocolError

__all__ = ("InputList", "Output", "Outputs", "TensorData", "itemsize", "pack", "unpack")


@dataclass(frozen=True, slots=True)
class TensorData:
    """A dense C-contiguous array as bytes: numpy dtype string (e.g. "<f4"), shape, data."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def rows(self) -> list[list[float]]:
        """A 2-D float32 array as Python lists.

        Raises:
            TypeError: the array is not 2-D float32.
        """
        if self.dtype != "<f4" or len(self.shape) != 2:
            raise TypeError(f"expected a 2-D <f4 array, got {self.dtype} {self.shape}")
        flat = memoryview(self.data).cast("f")
        n, d = self.shape
        return [cast("list[float]", flat[i * d : (i + 1) * d].tolist()) for i in range(n)]

    def slice_rows(self, start: int, stop: int) -> TensorData:
        """Rows [start, stop) along the first dimension."""
        n = self.shape[0]
        row = len(self.data) // n if n else 0
        return TensorData(self.dtype, (stop - start, *self.shape[1:]), self.data[start * row : stop * row])

    def row_bytes(self) -> list[bytes]:
        """The bytes of each row along the first dimension."""
        n = self.shape[0] if self.shape else 0
        size = len(self.data) // n if n else 0
        return [self.data[i * size : (i + 1) * size] for i in range(n)]


Output = TensorData | list[str] | list[bytes] | list[TensorData]
"""One output of a batch: an array with a row per item, or one str / bytes / array per item."""
Outputs = dict[str, Output]
InputList = list[str] | list[bytes] | list[TensorData]
"""One input of a batch: texts, byte strings, or arrays of one dtype (e.g. RGB images)."""


def pack(name: str, values: InputList) -> tuple[list[bytes], Callable[[m.Span], m.Input]]:
    """The bytes to place for one input list, and how to describe them once placed.

    Raises:
        TypeError: arrays of one input list do not share a dtype.
    """
    if not values or isinstance(values[0], str):
        encoded = [cast("str", v).encode("utf-8") for v in values]
        return encoded, lambda span: m.Text(span, [len(b) for b in encoded])
    if isinstance(values[0], bytes):
        blobs = values
        return blobs, lambda span: m.Blobs(span, [len(b) for b in blobs])
    arrays = values
    dtype = arrays[0].dtype
    if any(a.dtype != dtype for a in arrays):
        raise TypeError(f"input {name!r}: arrays of one batch must share a dtype")
    return [a.data for a in arrays], lambda span: m.Arrays(span, dtype, [a.shape for a in arrays])


def itemsize(dtype: str) -> int:
    """Bytes per element of a numpy dtype string: byte order, kind, item size ("|u1", "<f4")."""
    return int(dtype[2:])


def unpack(item: m.Input, raw: bytes) -> Output:
    """Python values of one payload, from its descriptor and its bytes (copied out of the ring)."""
    match item:
        case m.Tensor(dtype=dtype, shape=shape):
            return TensorData(dtype, tuple(shape), raw)
        case m.Text(lengths=lengths):
            return [b.decode("utf-8") for b in m.split(raw, lengths)]
        case m.Blobs(lengths=lengths):
            return m.split(raw, lengths)
        case m.Arrays(dtype=dtype, shapes=shapes):
            lengths = [math.prod(s) * itemsize(dtype) for s in shapes]
            return [TensorData(dtype, tuple(s), b) for s, b in zip(shapes, m.split(raw, lengths), strict=True)]
    raise ProtocolError(f"unknown payload kind {type(item).__name__}")  # pragma: no cover - the union is closed
