"""Light pipelines for lifecycle and IPC tests: real worker processes, no torch import.

Each is loaded by a real worker through the same `module:Class` mechanism as the task
pipelines; the tests put this folder on the worker's PYTHONPATH.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from modelmora_workers import cancel
from modelmora_workers.pipelines.base import InputError


class Echo:
    """Embeds each text as [len(text), sum of code points, index in batch, batch size]; texts drive faults."""

    def __init__(self, path: str, *, device: str, dtype: str, options: dict[str, Any]) -> None:
        self.device = "cpu"
        self.path = Path(path)
        if (self.path / "FAIL_LOAD").exists():
            raise RuntimeError("load failure requested by the test")
        weights = self.path / "weights.bin"
        self.weights = weights.read_bytes() if weights.exists() else b""  # resident, like real weights

    def warmup(self) -> None:
        if (self.path / "FAIL_WARMUP").exists():
            raise RuntimeError("warm-up failure requested by the test")

    def run(self, inputs: dict[str, Any], params: dict[str, Any]) -> dict[str, np.ndarray]:
        texts: list[str] = inputs["text"]
        rows = []
        for i, t in enumerate(texts):
            if t == "__crash__":
                os.kill(os.getpid(), signal.SIGKILL)
            if t == "__raise__":
                raise RuntimeError("boom")
            if t == "__bad__":
                raise InputError("this text is refused", f"$.input_data.text[{i}]")
            if t.startswith("__sleep__"):
                time.sleep(float(t.removeprefix("__sleep__")))
            if t.startswith("__steps__"):  # a long job in 0.1 s steps, cancellable between steps
                for _ in range(int(t.removeprefix("__steps__"))):
                    cancel.check()
                    time.sleep(0.1)
            rows.append([float(len(t)), float(sum(map(ord, t))), float(i), float(len(texts))])
        return {"embeddings": np.asarray(rows, dtype=np.float32).reshape(len(texts), 4)}
