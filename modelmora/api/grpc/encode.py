"""The core's typed results, registry records and status as gRPC messages."""

from __future__ import annotations

from typing import Any

import msgspec

from ..._proto.modelmora import v1
from ...config import ModelSettings
from ...registry import ModelRecord
from ...results import absolute_url
from ...service import Embeddings, Images, InferResult, ModelStatus, Output, ServerStatus, StreamEvent, Texts

__all__ = ("event_message", "infer_response", "model_message", "model_status", "server_status", "task_type")

_FINISH = {"stop": v1.FinishReason.STOP, "length": v1.FinishReason.LENGTH}


def task_type(name: str) -> v1.TaskType:
    """A task type's wire name ("txt2embed") as the enum; UNSPECIFIED for one we do not know."""
    try:
        return v1.TaskType[name.upper()]
    except KeyError:
        return v1.TaskType.UNSPECIFIED


def _output(output: Output, base_url: str) -> dict[str, Any]:
    match output:
        case Embeddings(vectors):
            if vectors.dtype != "<f4":  # pragma: no cover - every embedding pipeline answers float32
                raise TypeError(f"embeddings of dtype {vectors.dtype}, expected <f4")
            return {"embeddings": v1.Embeddings(data=bytes(vectors.data), shape=list(vectors.shape))}
        case Texts(texts, reasons):
            finish = [_FINISH.get(r, v1.FinishReason.UNSPECIFIED) for r in reasons]
            return {"texts": v1.Texts(texts=list(texts), finish_reasons=finish)}
        case Images(images):
            return {
                "images": v1.GeneratedImages(
                    images=[
                        v1.GeneratedImage(png=i.png)
                        if i.png is not None
                        else v1.GeneratedImage(url=absolute_url(i.url or "", base_url), expires_at=i.expires_at)
                        for i in images
                    ]
                )
            }
    raise AssertionError(f"unknown output {output!r}")  # pragma: no cover


def infer_response(result: InferResult, request_id: str, base_url: str) -> v1.InferResponse:
    """A finished request; relative result URLs are made absolute against `base_url`."""
    t = result.timing
    return v1.InferResponse(
        request_id=request_id,
        model_id=result.model_id,
        version=result.version,
        task_type=task_type(str(result.task)),
        timing=v1.Timing(queue_ms=t.queue_ms, inference_ms=t.inference_ms, total_ms=t.total_ms),
        **_output(result.output, base_url),
    )


def event_message(event: StreamEvent) -> v1.GenerateEvent:
    """A token or progress event of a streaming request."""
    data = event.data
    if event.kind == "token":
        return v1.GenerateEvent(token=v1.TokenEvent(index=int(data.get("index", 0)), text=str(data["text"])))
    return v1.GenerateEvent(
        progress=v1.ProgressEvent(
            index=max(0, int(data.get("index", 0))), step=int(data.get("step", 0)), steps=int(data.get("steps", 0))
        )
    )


def model_message(rec: ModelRecord) -> v1.Model:
    """A registry record."""
    settings = msgspec.convert(rec.settings, ModelSettings)
    return v1.Model(
        id=rec.id,
        task_type=task_type(rec.task),
        source=rec.source,
        active_version=rec.active_version,
        versions=[
            v1.ModelVersion(
                version=v.version,
                revision=v.revision,
                size_bytes=v.size_bytes,
                files=len(v.files),
                created_at=v.created_at,
            )
            for v in rec.versions
        ],
        settings=v1.ModelSettings(**msgspec.to_builtins(settings)),
    )


def _fields(struct: msgspec.Struct, message: type[Any], **override: Any) -> Any:
    """`message` built from the Struct's fields of the same names (`override` replaces some)."""
    values = {f: getattr(struct, f) for f in struct.__struct_fields__ if f in message.__dataclass_fields__}
    return message(**{**values, **override})


def model_status(status: ModelStatus) -> v1.ModelStatus:
    """The runtime status of one model version."""
    worker = status.worker
    message: v1.ModelStatus = _fields(
        status,
        v1.ModelStatus,
        history=[v1.StateChange(at=h.at, state=h.state, reason=h.reason) for h in status.history],
        worker=_fields(worker, v1.WorkerStatus, start_ms=dict(worker.start_ms)) if worker is not None else None,
    )
    return message


def server_status(status: ServerStatus) -> v1.ServerStatus:
    """What /api/v1/status reports."""
    zygote = status.zygote
    images = status.images
    return v1.ServerStatus(
        supervisor=_fields(status.supervisor, v1.SupervisorStatus),
        zygote=_zygote(zygote) if zygote is not None else None,
        budget=_fields(status.budget, v1.BudgetStatus),
        images=v1.ImageBudgetStatus(
            capacity_pixels=images.capacity_pixels,
            in_use_pixels=images.in_use_pixels,
            waiting=images.waiting,
            waiting_pixels=images.waiting_pixels,
        ),
        shared_memory=_fields(status.shared_memory, v1.SharedMemoryStatus),
        models=[model_status(m) for m in status.models],
    )


def _zygote(zygote: dict[str, Any]) -> v1.ZygoteStatus:
    known = v1.ZygoteStatus.__dataclass_fields__
    values = {k: v for k, v in zygote.items() if k in known}
    values["preload"] = list(values.get("preload", ()))
    values["failed_imports"] = {str(k): str(v) for k, v in (values.get("failed_imports") or {}).items()}
    return v1.ZygoteStatus(**values)
