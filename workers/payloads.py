"""The worker's side of the payload codec: numpy views over ring spans, and outputs into spans.

The mirror of `modelmora.ipc.payloads` (the supervisor's side, without numpy): inputs arrive as
descriptors of spans in the request ring (or a large segment) and become numpy arrays that
view those bytes in place (texts and byte strings are copied out); outputs are written into
spans the worker reserves in the response ring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from modelmora.ipc import messages as m

__all__ = ("Reserve", "decode", "encode")

Reserve = Callable[[int], tuple[m.Span, memoryview]]
"""Reserves a span of that many bytes in the response ring and returns it with a writable view."""


def decode(item: m.Input, view: memoryview) -> Any:
    """One input list from its descriptor and a view of its bytes: strings, byte strings, a list of
    arrays (`Arrays`) or one array (`Tensor`). Arrays are views: valid until the span is released."""
    match item:
        case m.Text(lengths=lengths):
            return [chunk.decode("utf-8") for chunk in m.split(bytes(view), lengths)]
        case m.Blobs(lengths=lengths):
            return m.split(bytes(view), lengths)
        case m.Arrays(dtype=dtype, shapes=shapes):
            dt = np.dtype(dtype)
            out, pos = [], 0
            for shape in shapes:
                n = int(np.prod(shape)) * dt.itemsize
                out.append(np.frombuffer(view[pos : pos + n], dtype=dt).reshape(shape))
                pos += n
            return out
        case m.Tensor(dtype=dtype, shape=shape):
            return np.frombuffer(view, dtype=np.dtype(dtype)).reshape(shape)
    raise TypeError(f"unknown input kind {type(item).__name__}")  # pragma: no cover - the union is closed


def encode(value: Any, reserve: Reserve) -> m.Input:
    """Place one output in a span from `reserve`: an array, or a list of str or bytes.

    Raises:
        TypeError: `value` is neither an array nor a list.
        modelmora.ipc.ring.ExceedsRing: it is larger than the whole ring (from `reserve`).
    """
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        span, view = reserve(array.nbytes)
        np.frombuffer(view, dtype=np.uint8)[:] = array.reshape(-1).view(np.uint8)
        view.release()
        return m.Tensor(span, array.dtype.str, tuple(array.shape))
    if not isinstance(value, list):
        raise TypeError(f"pipeline output must be an array or a list, not {type(value).__name__}")
    is_text = all(isinstance(v, str) for v in value)
    chunks = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in value]
    span, view = reserve(sum(len(c) for c in chunks))
    pos = 0
    for c in chunks:
        view[pos : pos + len(c)] = c
        pos += len(c)
    view.release()
    lengths = [len(c) for c in chunks]
    return m.Text(span, lengths) if is_text else m.Blobs(span, lengths)
