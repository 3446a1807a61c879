"""A light pipeline for the zygote tests: reports what a forked worker inherited."""

from __future__ import annotations

import os
import random
import sys
from typing import Any

import numpy as np


class Probe:
    """Each row: [random.random(), numpy's legacy global random(), parent pid, float($MM_PROBE or -1),
    whether $MM_ONLY_IN_THE_ZYGOTE is set, whether tests/lifecycle/extra is on sys.path,
    $TOKENIZERS_PARALLELISM == "true" (1), "false" (0) or unset (-1), float($RAYON_NUM_THREADS or -1),
    whether PYTORCH_NVML_BASED_CUDA_CHECK is "1"]."""

    def __init__(self, path: str, *, device: str, dtype: str, options: dict[str, Any]) -> None:
        self.device = "cpu"

    def warmup(self) -> None:
        pass

    def run(self, inputs: dict[str, Any], params: dict[str, Any]) -> dict[str, np.ndarray]:
        rows = [
            [
                random.random(),
                float(np.random.random()),
                float(os.getppid()),
                float(os.environ.get("MM_PROBE", "-1")),
                float("MM_ONLY_IN_THE_ZYGOTE" in os.environ),
                float(any(p.endswith("extra") for p in sys.path)),
                {"true": 1.0, "false": 0.0}.get(os.environ.get("TOKENIZERS_PARALLELISM", ""), -1.0),
                float(os.environ.get("RAYON_NUM_THREADS", "-1")),
                float(os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1"),
            ]
            for _ in inputs["text"]
        ]
        return {"embeddings": np.asarray(rows, dtype=np.float64).astype(np.float32)}
