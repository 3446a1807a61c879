"""The pipelines keep no parameter defaults: they read what the supervisor sends, and a missing
parameter is a protocol error naming it (the defaults live in the API schema only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelmora.ipc.control import ProtocolError
from modelmora.service import ADAPTERS, CaptionParameters
from modelmora.tasks import TaskType
from modelmora_workers.pipelines.base import param
from modelmora_workers.pipelines.text_embedding import TextEmbedding

from .params import worker_params


def test_param_returns_what_was_sent_and_names_what_was_not() -> None:
    assert param({"seed": None, "steps": 3}, "steps") == 3
    assert param({"seed": None}, "seed") is None  # an optional parameter the client left out
    with pytest.raises(ProtocolError, match=r"parameter 'steps' missing .*got seed\)"):
        param({"seed": None}, "steps")


def test_worker_params_are_what_the_core_sends() -> None:
    """The test helper goes through the core's own conversion: the schema's defaults, filled in."""
    assert worker_params("img2txt", batch_size=4) == {
        "max_tokens": 30,
        "temperature": 0.0,
        "seed": None,
        "batch_size": 4,
    }
    adapter = ADAPTERS[TaskType.IMG2TXT]
    assert worker_params("img2txt", max_tokens=5) == {
        **adapter.worker_params(CaptionParameters(max_tokens=5), False),
        "batch_size": 8,
    }
    assert worker_params("txt2txt", stream=True)["stream"] is True
    assert worker_params("txt2embed") == {"normalize": False, "batch_size": 8}


# (fixture, task, inputs, values): each parameter the supervisor sends is read; without it, the
# pipeline stops with a protocol error naming it instead of running with a default of its own.
CASES = [
    ("img2embed", "img2embed", "image", {}),
    ("img2txt", "img2txt", "image", {"max_tokens": 2}),
    ("txt2txt", "txt2txt", "text", {"max_tokens": 2}),
    ("txt2img", "txt2img", "text", {"steps": 1}),
]


@pytest.mark.parametrize(
    ("fixture", "task", "name"),
    [(fixture, task, name) for fixture, task, _, values in CASES for name in worker_params(task, **values)],
)
def test_a_missing_parameter_is_a_protocol_error(
    fixture: str, task: str, name: str, request: pytest.FixtureRequest, images: list[np.ndarray]
) -> None:
    pipe = request.getfixturevalue(fixture)
    kind, values = next((kind, values) for f, _, kind, values in CASES if f == fixture)
    inputs: dict[str, Any] = {"image": images[:1]} if kind == "image" else {"text": ["Hello"]}
    params = worker_params(task, batch_size=1, **values)
    assert pipe.run(inputs, params)  # everything there: it runs
    del params[name]
    with pytest.raises(ProtocolError, match=f"parameter '{name}' missing"):
        pipe.run(inputs, params)


def test_a_missing_embedding_parameter_is_a_protocol_error(minilm_path: Path) -> None:
    pipe = TextEmbedding(str(minilm_path), device="cpu", dtype="auto", options={})
    for name in worker_params("txt2embed"):
        params = worker_params("txt2embed")
        del params[name]
        with pytest.raises(ProtocolError, match=f"parameter '{name}' missing"):
            pipe.run({"text": ["Hello"]}, params)
