# ruff: noqa: ASYNC109  (`timeout` is the call's gRPC deadline, the name grpclib and grpcio use)
"""The registry and management calls of `AsyncClient`: `models`, `model`, `update_settings`,
`delete_model`, `status`, `load`, `unload`."""

from __future__ import annotations

from collections.abc import Mapping

from grpclib.client import Channel
from grpclib.metadata import Deadline

from .._proto.modelmora import v1
from . import _requests as req
from ._calls import ClientCalls, optional
from ._convert import model_info, model_state, server_status
from .results import DeletedModel, ModelInfo, ModelState, ServerStatus

__all__ = ("ManageMethods",)


class ManageMethods(ClientCalls):
    """The registry (what is installed) and the runtime (what runs), for `AsyncClient`."""

    async def models(
        self, task_type: str | None = None, *, timeout: float | None = None, metadata: Mapping[str, str] | None = None
    ) -> list[ModelInfo]:
        """Installed models, optionally of one task type ("txt2embed", "img2embed", "img2txt",
        "txt2txt", "txt2img")."""
        task = v1.TaskType.UNSPECIFIED
        if task_type is not None:
            try:
                task = v1.TaskType[task_type.upper()]
            except KeyError:
                raise req.refuse(f"unknown task type {task_type!r}", "task_type") from None

        async def call(channel: Channel, deadline: Deadline | None, md: dict[str, str] | None) -> v1.ListModelsResponse:
            stub = v1.RegistryServiceStub(channel)
            return await stub.list_models(v1.ListModelsRequest(task_type=task), deadline=deadline, metadata=md)

        listed = await self._unary("ListModels", call, idempotent=True, timeout=timeout, metadata=metadata)
        return [model_info(m) for m in listed.models]

    async def model(
        self, model_id: str, *, timeout: float | None = None, metadata: Mapping[str, str] | None = None
    ) -> ModelInfo:
        """One installed model."""

        async def call(channel: Channel, deadline: Deadline | None, md: dict[str, str] | None) -> v1.Model:
            stub = v1.RegistryServiceStub(channel)
            return await stub.get_model(v1.GetModelRequest(model_id=model_id), deadline=deadline, metadata=md)

        return model_info(await self._unary("GetModel", call, idempotent=True, timeout=timeout, metadata=metadata))

    async def update_settings(
        self,
        model_id: str,
        *,
        max_batch_size: int | None = None,
        max_wait_ms: float | None = None,
        queue_limit: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        pinned: bool | None = None,
        preload: bool | None = None,
        keep_alive: str | None = None,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ModelInfo:
        """Replace a model's own settings with those given (one left out takes the server's default)
        and return the model; running versions take them at once (device and dtype: their worker is
        replaced when idle). `keep_alive` is a duration ("10m", "30s", "0", "-1")."""
        settings = v1.ModelSettings(
            **optional(
                max_batch_size=max_batch_size,
                max_wait_ms=max_wait_ms,
                queue_limit=queue_limit,
                device=device,
                dtype=dtype,
                pinned=pinned,
                preload=preload,
                keep_alive=keep_alive,
            )
        )
        message = v1.UpdateModelSettingsRequest(model_id=model_id, settings=settings)

        async def call(channel: Channel, deadline: Deadline | None, md: dict[str, str] | None) -> v1.Model:
            stub = v1.RegistryServiceStub(channel)
            return await stub.update_model_settings(message, deadline=deadline, metadata=md)

        updated = await self._unary("UpdateModelSettings", call, idempotent=True, timeout=timeout, metadata=metadata)
        return model_info(updated)

    async def delete_model(
        self, model_id: str, *, timeout: float | None = None, metadata: Mapping[str, str] | None = None
    ) -> DeletedModel:
        """Unload every version of a model (its queued requests drain first), remove it from the
        registry and delete its copied files. Not idempotent: retried only when never sent."""
        message = v1.DeleteModelRequest(model_id=model_id)

        async def call(
            channel: Channel, deadline: Deadline | None, md: dict[str, str] | None
        ) -> v1.DeleteModelResponse:
            return await v1.RegistryServiceStub(channel).delete_model(message, deadline=deadline, metadata=md)

        deleted = await self._unary("DeleteModel", call, idempotent=False, timeout=timeout, metadata=metadata)
        return DeletedModel(deleted.model_id, tuple(deleted.versions))

    async def status(self, *, timeout: float | None = None, metadata: Mapping[str, str] | None = None) -> ServerStatus:
        """The server's runtime: supervisor, memory budget, every model version's state."""

        async def call(channel: Channel, deadline: Deadline | None, md: dict[str, str] | None) -> v1.ServerStatus:
            stub = v1.ManagementServiceStub(channel)
            return await stub.get_status(v1.GetStatusRequest(), deadline=deadline, metadata=md)

        return server_status(await self._unary("GetStatus", call, idempotent=True, timeout=timeout, metadata=metadata))

    async def load(
        self,
        model: str,
        version: str | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ModelState:
        """Load and warm up a model version now (default: its active version); returns once ready."""

        async def call(channel: Channel, deadline: Deadline | None, md: dict[str, str] | None) -> v1.ModelStatus:
            message = v1.LoadModelRequest(model_id=model, version=version or "")
            return await v1.ManagementServiceStub(channel).load_model(message, deadline=deadline, metadata=md)

        return model_state(await self._unary("LoadModel", call, idempotent=True, timeout=timeout, metadata=metadata))

    async def unload(
        self,
        model: str,
        version: str | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ModelState:
        """Drain a model version's queue, stop its worker and give its memory back."""

        async def call(channel: Channel, deadline: Deadline | None, md: dict[str, str] | None) -> v1.ModelStatus:
            message = v1.UnloadModelRequest(model_id=model, version=version or "")
            return await v1.ManagementServiceStub(channel).unload_model(message, deadline=deadline, metadata=md)

        return model_state(await self._unary("UnloadModel", call, idempotent=True, timeout=timeout, metadata=metadata))
