"""The task-type table: every task type ModelMora serves, and what each needs and can do.

One `TaskInfo` per `TaskType`. Everything that depends on the task type (the worker
pipeline, the kind of input, the default deadline, the libraries the zygote imports ahead,
whether requests batch and stream) reads it from here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

__all__ = ("TASKS", "InputKind", "TaskInfo", "TaskType", "task_info")

InputKind = Literal["text", "image"]


class TaskType(enum.StrEnum):
    """A task type, by its wire name."""

    TXT2EMBED = "txt2embed"
    IMG2EMBED = "img2embed"
    IMG2TXT = "img2txt"
    TXT2TXT = "txt2txt"
    TXT2IMG = "txt2img"


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """What one task type needs and can do."""

    type: TaskType
    pipeline: str
    """The worker pipeline, "module:Class", imported inside the worker process."""
    input_kind: InputKind
    timeout_s: float
    """Default request deadline (the `[timeout_s]` settings section overrides it)."""
    preload: tuple[str, ...] = ()
    """Libraries the zygote imports too when a model of this type is registered (beyond
    `zygote_preload`: too heavy to import for every server)."""
    streams: bool = False
    """Sends events while it runs (tokens, progress): `"stream": true` is allowed."""
    output: Literal["embeddings", "texts", "images"] = "embeddings"


_PIPELINES = "modelmora_workers.pipelines."

TASKS: dict[TaskType, TaskInfo] = {
    info.type: info
    for info in (
        TaskInfo(TaskType.TXT2EMBED, _PIPELINES + "text_embedding:TextEmbedding", "text", 30.0),
        TaskInfo(TaskType.IMG2EMBED, _PIPELINES + "image_embedding:ImageEmbedding", "image", 30.0),
        TaskInfo(TaskType.IMG2TXT, _PIPELINES + "image_to_text:ImageToText", "image", 120.0, output="texts"),
        TaskInfo(
            TaskType.TXT2TXT, _PIPELINES + "text_generation:TextGeneration", "text", 300.0, streams=True, output="texts"
        ),
        TaskInfo(
            TaskType.TXT2IMG,
            _PIPELINES + "text_to_image:TextToImage",
            "text",
            600.0,
            preload=("diffusers",),
            streams=True,
            output="images",
        ),
    )
}
"""Task type -> what it needs and can do."""


def task_info(name: str) -> TaskInfo | None:
    """The entry of a task type by its wire name; None for a name we do not serve."""
    try:
        return TASKS[TaskType(name)]
    except ValueError:
        return None
