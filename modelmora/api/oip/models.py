"""The Open Inference Protocol's server and model endpoints over the core, the same for REST and
gRPC: server metadata, model metadata, model readiness, and the repository extension (index,
load, unload)."""

from __future__ import annotations

from dataclasses import dataclass

from ... import __version__
from ...errors import ModelNotFound
from ...registry import ModelRecord
from ...service import InferenceService, ModelStatus
from ...tasks import TaskType
from .tensors import INPUTS, OUTPUTS, TensorSpec

__all__ = (
    "EXTENSIONS",
    "SERVER_NAME",
    "IndexEntry",
    "ModelMetadata",
    "model_metadata",
    "model_ready",
    "repository_index",
    "server_version",
)

SERVER_NAME = "modelmora"
EXTENSIONS = ("binary_tensor_data", "parameters", "model_repository")


def server_version() -> str:
    return __version__


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    """"modelmora_" and the task type (e.g. "modelmora_txt2embed")."""
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: str
    """READY, LOADING, UNLOADING or UNAVAILABLE (with the reason: our own state, or the last error)."""
    reason: str


def _check_version(rec: ModelRecord, version: str | None) -> str:
    wanted = version or rec.active_version
    if rec.version_record(wanted) is None:
        raise ModelNotFound(f"model {rec.id!r} has no version {wanted!r}", field="$.version")
    return wanted


async def model_metadata(service: InferenceService, name: str, version: str | None) -> ModelMetadata:
    """Raises: ModelNotFound: no such model or version."""
    rec = await service.model(name)
    _check_version(rec, version)
    task = TaskType(rec.task)
    versions = [v.version for v in rec.versions]
    return ModelMetadata(rec.id, versions, f"modelmora_{task}", [INPUTS[task]], [OUTPUTS[task]])


async def _statuses(service: InferenceService) -> list[ModelStatus]:
    return (await service.status()).models


async def model_ready(service: InferenceService, name: str, version: str | None) -> bool:
    """True when the version has a warm worker.

    Raises:
        ModelNotFound: no such model or version.
    """
    rec = await service.model(name)
    wanted = _check_version(rec, version)
    return any(s.model_id == name and s.version == wanted and s.state == "ready" for s in await _statuses(service))


_STATES = {"ready": "READY", "loading": "LOADING", "warming": "LOADING", "downloading": "LOADING"}


async def repository_index(service: InferenceService, ready_only: bool) -> list[IndexEntry]:
    """Every installed model version (only the ready ones with `ready_only`)."""
    out = []
    for s in await _statuses(service):
        state = _STATES.get(s.state, "UNLOADING" if s.state == "unloading" else "UNAVAILABLE")
        if ready_only and state != "READY":
            continue
        reason = "" if state in ("READY", "LOADING", "UNLOADING") else (s.last_error or s.state)
        out.append(IndexEntry(s.model_id, s.version, state, reason))
    return out
