"""A test pipeline that imports torch (kept apart from the light ones, which never do)."""

from __future__ import annotations

import ctypes
import time
from typing import Any

import numpy as np


def _omp() -> Any:
    """The OpenMP runtime torch loaded: its thread count is per calling thread (torch.get_num_threads
    reports the last value set in the process, whichever thread set it)."""
    with open("/proc/self/maps") as maps:
        path = next(line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line)
    return ctypes.CDLL(path)


class TorchThreads:
    """Concurrent; each row: [OpenMP threads of the thread that ran the batch]. A text
    `__sleep__S` holds the batch S seconds first."""

    concurrent = True

    def __init__(self, path: str, *, device: str, dtype: str, options: dict[str, Any]) -> None:
        import torch

        torch.zeros(64, 64) @ torch.zeros(64, 64)  # loads the OpenMP runtime
        self.omp = _omp()
        self.device = "cpu"

    def warmup(self) -> None:
        pass

    def run(self, inputs: dict[str, Any], params: dict[str, Any]) -> dict[str, np.ndarray]:
        texts: list[str] = inputs["text"]
        for t in texts:
            if t.startswith("__sleep__"):
                time.sleep(float(t.removeprefix("__sleep__")))
        return {"embeddings": np.full((len(texts), 1), float(self.omp.omp_get_max_threads()), dtype=np.float32)}
