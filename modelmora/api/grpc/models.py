"""The RegistryService and ManagementService servicers: the registry, load/unload, the status."""

from __future__ import annotations

import msgspec
from grpclib.const import Cardinality, Handler
from grpclib.server import Stream

from ..._proto.modelmora import v1
from ...config import ModelSettings
from ...errors import InvalidInput
from ...service import InferenceService, split_validation
from .calls import Calls
from .encode import model_message, model_status, server_status

__all__ = ("ManagementServicer", "RegistryServicer")

_REGISTRY = "/modelmora.v1.RegistryService/"
_TASK_NAMES: dict[int, str | None] = {
    int(t): None if t == v1.TaskType.UNSPECIFIED else str(t.name).lower() for t in v1.TaskType
}
"""TaskType numbers -> wire names (UNSPECIFIED: every task type)."""
_MANAGEMENT = "/modelmora.v1.ManagementService/"


def _settings(message: v1.ModelSettings | None) -> ModelSettings:
    """The message's set fields as the core's ModelSettings (validated: INVALID_ARGUMENT naming the field)."""
    values = {}
    if message is not None:
        values = {f: getattr(message, f) for f in ModelSettings.__struct_fields__ if getattr(message, f) is not None}
    try:
        return msgspec.convert(values, ModelSettings)
    except msgspec.ValidationError as exc:
        text, field = split_validation(exc, "settings", ModelSettings)
        raise InvalidInput(text, field=field) from None


def _model_id(model_id: str) -> str:
    if not model_id:
        raise InvalidInput("model_id is required", field="model_id")
    return model_id


class RegistryServicer:
    """`modelmora.v1.RegistryService`: what is installed."""

    def __init__(self, service: InferenceService, calls: Calls) -> None:
        self.service = service
        self.calls = calls

    def __mapping__(self) -> dict[str, Handler]:
        unary = Cardinality.UNARY_UNARY
        return {
            _REGISTRY + "ListModels": Handler(self.list_models, unary, v1.ListModelsRequest, v1.ListModelsResponse),
            _REGISTRY + "GetModel": Handler(self.get_model, unary, v1.GetModelRequest, v1.Model),
            _REGISTRY + "UpdateModelSettings": Handler(
                self.update_model_settings, unary, v1.UpdateModelSettingsRequest, v1.Model
            ),
            _REGISTRY + "DeleteModel": Handler(self.delete_model, unary, v1.DeleteModelRequest, v1.DeleteModelResponse),
        }

    async def list_models(self, stream: Stream[v1.ListModelsRequest, v1.ListModelsResponse]) -> None:
        async with self.calls.guard(stream, "ListModels"):  # type: ignore[arg-type]
            req = await stream.recv_message()
            assert req is not None
            number = int(req.task_type)
            if number not in _TASK_NAMES:
                raise InvalidInput(f"unknown task type {number}", field="task_type")
            records = await self.service.models(_TASK_NAMES[number])
            await stream.send_message(v1.ListModelsResponse(models=[model_message(r) for r in records]))

    async def get_model(self, stream: Stream[v1.GetModelRequest, v1.Model]) -> None:
        async with self.calls.guard(stream, "GetModel"):  # type: ignore[arg-type]
            req = await stream.recv_message()
            assert req is not None
            await stream.send_message(model_message(await self.service.model(_model_id(req.model_id))))

    async def update_model_settings(self, stream: Stream[v1.UpdateModelSettingsRequest, v1.Model]) -> None:
        async with self.calls.guard(stream, "UpdateModelSettings") as context:  # type: ignore[arg-type]
            req = await stream.recv_message()
            assert req is not None
            settings = _settings(req.settings)
            rec = await self.service.update_settings(_model_id(req.model_id), settings, identity=context.identity)
            await stream.send_message(model_message(rec))

    async def delete_model(self, stream: Stream[v1.DeleteModelRequest, v1.DeleteModelResponse]) -> None:
        async with self.calls.guard(stream, "DeleteModel") as context:  # type: ignore[arg-type]
            req = await stream.recv_message()
            assert req is not None
            rec = await self.service.delete(_model_id(req.model_id), identity=context.identity)
            await stream.send_message(
                v1.DeleteModelResponse(model_id=rec.id, versions=[v.version for v in rec.versions])
            )


class ManagementServicer:
    """`modelmora.v1.ManagementService`: running models."""

    def __init__(self, service: InferenceService, calls: Calls) -> None:
        self.service = service
        self.calls = calls

    def __mapping__(self) -> dict[str, Handler]:
        unary = Cardinality.UNARY_UNARY
        return {
            _MANAGEMENT + "LoadModel": Handler(self.load_model, unary, v1.LoadModelRequest, v1.ModelStatus),
            _MANAGEMENT + "UnloadModel": Handler(self.unload_model, unary, v1.UnloadModelRequest, v1.ModelStatus),
            _MANAGEMENT + "GetStatus": Handler(self.get_status, unary, v1.GetStatusRequest, v1.ServerStatus),
        }

    async def load_model(self, stream: Stream[v1.LoadModelRequest, v1.ModelStatus]) -> None:
        async with self.calls.guard(stream, "LoadModel") as context:  # type: ignore[arg-type]
            req = await stream.recv_message()
            assert req is not None
            model_id, version = _model_id(req.model_id), req.version or None
            status = await self.service.load(model_id, version, identity=context.identity)
            await stream.send_message(model_status(status))

    async def unload_model(self, stream: Stream[v1.UnloadModelRequest, v1.ModelStatus]) -> None:
        async with self.calls.guard(stream, "UnloadModel") as context:  # type: ignore[arg-type]
            req = await stream.recv_message()
            assert req is not None
            model_id, version = _model_id(req.model_id), req.version or None
            status = await self.service.unload(model_id, version, identity=context.identity)
            await stream.send_message(model_status(status))

    async def get_status(self, stream: Stream[v1.GetStatusRequest, v1.ServerStatus]) -> None:
        async with self.calls.guard(stream, "GetStatus"):  # type: ignore[arg-type]
            await stream.recv_message()
            await stream.send_message(server_status(await self.service.status()))
