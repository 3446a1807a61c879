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

STEPS_FILE = "STEPS"
"""In the model's directory: one byte per step a stepped job ran (`__steps__N`, Shout), so that a
test can tell a job that stopped at cancellation from one that ran to its end."""


def _step_done(model_dir: Path) -> None:
    with (model_dir / STEPS_FILE).open("ab") as f:
        f.write(b".")


def steps_run(model_dir: str | Path) -> int:
    """How many steps the stepped jobs of the model in `model_dir` ran so far."""
    path = Path(model_dir) / STEPS_FILE
    return path.stat().st_size if path.exists() else 0


class Echo:
    """Embeds each text as [len(text), sum of code points, index in batch, batch size]; texts drive faults."""

    def __init__(self, path: str, *, device: str, dtype: str, options: dict[str, Any]) -> None:
        self.device = device if device.startswith("cuda") else "cpu"  # claims a GPU it never touches
        self.path = Path(path)
        vram = self.path / "VRAM_MB"
        if vram.exists():  # what a GPU pipeline would report (the worker asks `vram_bytes` first)
            self.vram_bytes = int(float(vram.read_text()) * 2**20)
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
            if t.startswith("__until__"):  # held until the test creates the file named after it
                while not os.path.exists(t.removeprefix("__until__")):
                    time.sleep(0.01)
            if t.startswith("__steps__"):  # a long job in 0.1 s steps, cancellable between steps
                for _ in range(int(t.removeprefix("__steps__"))):
                    cancel.check()
                    time.sleep(0.1)
                    _step_done(self.path)
            rows.append([float(len(t)), float(sum(map(ord, t))), float(i), float(len(texts))])
        return {"embeddings": np.asarray(rows, dtype=np.float32).reshape(len(texts), 4)}


class ConcurrentEcho(Echo):
    """Echo that may run on several inference streams at once."""

    concurrent = True


class ImageStats:
    """img2embed stand-in: each image becomes [height, width, mean R, mean G, mean B] (raw pixels in, checked)."""

    def __init__(self, path: str, *, device: str, dtype: str, options: dict[str, Any]) -> None:
        self.device = "cpu"

    def warmup(self) -> None:
        self.run({"image": [np.zeros((2, 3, 3), np.uint8)]}, {})

    def run(self, inputs: dict[str, Any], params: dict[str, Any]) -> dict[str, np.ndarray]:
        rows = [[*img.shape[:2], *img.reshape(-1, 3).mean(0)] for img in inputs["image"]]
        return {"embeddings": np.asarray(rows, dtype=np.float32)}


class Describe:
    """img2txt stand-in: "<width>x<height>", cut at max_tokens characters."""

    def __init__(self, path: str, *, device: str, dtype: str, options: dict[str, Any]) -> None:
        self.device = "cpu"

    def warmup(self) -> None:
        pass

    def run(self, inputs: dict[str, Any], params: dict[str, Any]) -> dict[str, list[str]]:
        limit = int(params.get("max_tokens", 30))
        texts = [f"{img.shape[1]}x{img.shape[0]}" for img in inputs["image"]]
        return {
            "texts": [t[:limit] for t in texts],
            "finish_reasons": ["length" if len(t) > limit else "stop" for t in texts],
        }


class Shout:
    """txt2txt stand-in: the prompt upper-cased, one character per step (streamed as tokens)."""

    def __init__(self, path: str, *, device: str, dtype: str, options: dict[str, Any]) -> None:
        self.device = "cpu"
        self.path = Path(path)

    def warmup(self) -> None:
        pass

    def run(self, inputs: dict[str, Any], params: dict[str, Any]) -> dict[str, list[str]]:
        from modelmora_workers import events

        out = []
        for i, prompt in enumerate(inputs["text"]):
            head = prompt.split(" ", 1)[0]
            delay = float(head.removeprefix("__slow__")) if head.startswith("__slow__") else 0.0
            text = prompt.upper()[: int(params.get("max_tokens", 64))]
            for ch in text:
                cancel.check()
                if params.get("stream"):
                    events.emit("token", {"text": ch}, item=i)
                time.sleep(delay)
                if delay:
                    _step_done(self.path)
            out.append(text)
        return {
            "texts": out,
            "finish_reasons": [
                "length" if len(t) < len(p) else "stop" for t, p in zip(out, inputs["text"], strict=True)
            ],
        }


class Painter:
    """txt2img stand-in: a PNG of the requested size filled with a colour from the prompt and seed."""

    def __init__(self, path: str, *, device: str, dtype: str, options: dict[str, Any]) -> None:
        self.device = "cpu"

    def warmup(self) -> None:
        pass

    def run(self, inputs: dict[str, Any], params: dict[str, Any]) -> dict[str, list[bytes]]:
        import io

        from PIL import Image

        from modelmora_workers import events

        steps = int(params.get("steps", 2))
        for step in range(steps):
            cancel.check()
            events.emit("progress", {"step": step + 1, "steps": steps})
        images = []
        for prompt in inputs["text"]:
            shade = (sum(map(ord, prompt)) + int(params.get("seed") or 0)) % 256
            img = Image.new("RGB", (params.get("width") or 64, params.get("height") or 64), (shade, 0, 255 - shade))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            images.append(buf.getvalue())
        return {"images": images}
