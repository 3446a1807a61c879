"""The payload codec: the supervisor's side (no numpy) against the worker's numpy mirror, over a ring."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from modelmora.ipc import messages as m
from modelmora.ipc.payloads import TensorData, pack, unpack
from modelmora.ipc.ring import ShmRing
from modelmora_workers import payloads as wp

CAPACITY = 1 << 14


@pytest.fixture
def ring() -> ShmRing:
    return ShmRing(memoryview(bytearray(ShmRing.region_size(CAPACITY))), CAPACITY, init=True)


def through(ring: ShmRing, name: str, values: Any) -> Any:
    """Pack as the supervisor does, place in the ring, decode as the worker does."""
    chunks, build = pack(name, values)
    item = build(ring.write_nowait(*chunks))
    return wp.decode(item, ring.view(item.span))


def test_texts_and_blobs_reach_the_worker(ring: ShmRing) -> None:
    assert through(ring, "text", ["héllo", "", "wörld"]) == ["héllo", "", "wörld"]
    assert through(ring, "blob", [b"\x00\x01", b"", b"xyz"]) == [b"\x00\x01", b"", b"xyz"]
    assert through(ring, "text", []) == []


def test_arrays_reach_the_worker_as_views(ring: ShmRing) -> None:
    a = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    b = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)
    got = through(ring, "image", [TensorData("|u1", a.shape, a.tobytes()), TensorData("|u1", b.shape, b.tobytes())])
    assert isinstance(got, list) and len(got) == 2
    np.testing.assert_array_equal(got[0], a)
    np.testing.assert_array_equal(got[1], b)
    assert not got[0].flags.owndata  # a view over the ring, not a copy


def test_arrays_of_one_input_share_a_dtype() -> None:
    with pytest.raises(TypeError, match="share a dtype"):
        pack("image", [TensorData("|u1", (1,), b"\0"), TensorData("<f4", (1,), b"\0" * 4)])


@pytest.mark.parametrize(
    "value",
    [
        np.arange(8, dtype=np.float32).reshape(2, 4),
        ["a", "bé", ""],
        [b"\x89PNG", b""],
    ],
    ids=["tensor", "texts", "blobs"],
)
def test_worker_outputs_reach_the_supervisor(ring: ShmRing, value: object) -> None:
    item = wp.encode(value, ring.reserve_nowait)
    out = unpack(item, ring.read(item.span))
    if isinstance(value, np.ndarray):
        assert isinstance(out, TensorData) and out.shape == (2, 4) and out.dtype == "<f4"
        assert out.rows() == value.tolist()
    else:
        assert out == value


def test_arrays_output_unpacks_per_item() -> None:
    a, b = bytes(range(6)), bytes(range(3))
    item = m.Arrays(m.Span("", 0, 9), "|u1", [(1, 2, 3), (1, 1, 3)])
    assert unpack(item, a + b) == [TensorData("|u1", (1, 2, 3), a), TensorData("|u1", (1, 1, 3), b)]


def test_other_outputs_are_refused(ring: ShmRing) -> None:
    with pytest.raises(TypeError, match="array or a list"):
        wp.encode({"not": "supported"}, ring.reserve_nowait)


def test_tensor_rows() -> None:
    t = TensorData("<f4", (3, 2), np.arange(6, dtype=np.float32).tobytes())
    assert t.slice_rows(1, 3).rows() == [[2.0, 3.0], [4.0, 5.0]]
    assert t.row_bytes()[2] == np.array([4.0, 5.0], dtype=np.float32).tobytes()
    with pytest.raises(TypeError):
        TensorData("|u1", (2,), b"\0\0").rows()
