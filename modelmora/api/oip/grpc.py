"""The Open Inference Protocol's gRPC form: `inference.GRPCInferenceService` (generated from
`schema/inference/grpc_predict_v2.proto`, wire-compatible with KServe's and Triton's), served by
the same grpclib server as our own services (asyncio only).

Inputs come as `raw_input_contents` (one entry per input, what Triton's clients send) or as
`contents.bytes_contents`; outputs always go as `raw_output_contents`. The call's gRPC deadline
bounds the request's deadline, as in our own services, and a cancelled call withdraws its request.
Errors end the call with the error's gRPC status and a message naming the tensor or parameter.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import anyio
import betterproto2
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.metadata import Deadline
from grpclib.server import Stream

from ..._proto import inference as pb
from ...errors import DeadlineExceeded, InvalidInput, ModelMoraError, RateLimited
from ...observability import current_trace
from ...security import ANONYMOUS, Identity
from ...service import InferCall, InferenceService
from ...tasks import TaskType
from ..grpc import Calls, current_permit
from .models import EXTENSIONS, SERVER_NAME, model_metadata, model_ready, repository_index, server_version
from .tensors import GRPC_PROTOCOL, InputTensor, describe_field, infer_call, output_tensors, pack_bytes

__all__ = ("OipServicer", "grpc_error")

_PATH = "/inference.GRPCInferenceService/"


def grpc_error(exc: ModelMoraError) -> GRPCError:
    return GRPCError(Status(int(exc.grpc_status)), describe_field(exc))


def _caller() -> Identity:
    """The caller of the call this task serves, as the gate admitted it (audited by its name)."""
    permit = current_permit()
    return permit.identity if permit is not None else ANONYMOUS


def _value(parameter: pb.InferParameter) -> Any:
    _, value = betterproto2.which_one_of(parameter, "parameter_choice")
    return value


def _inputs(req: pb.ModelInferRequest) -> list[InputTensor]:
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(req.inputs)} inputs")
    out = []
    for i, tensor in enumerate(req.inputs):
        contents = raw[i] if raw else pack_bytes(tensor.contents.bytes_contents if tensor.contents else [])
        out.append(InputTensor(tensor.name, tensor.datatype, list(tensor.shape), raw=contents))
    return out


def _bounded(call: InferCall, deadline: Deadline | None) -> InferCall:
    """The call with its timeout within the gRPC call's deadline."""
    if deadline is None:
        return call
    remaining = deadline.time_remaining()
    if remaining <= 0:
        raise DeadlineExceeded("the call's deadline passed before the request was queued")
    return dataclasses.replace(call, timeout_s=min(call.timeout_s or math.inf, remaining))


class OipServicer:
    """`inference.GRPCInferenceService` over the core."""

    def __init__(self, service: InferenceService, calls: Calls) -> None:
        self.service = service
        self.calls = calls

    def __mapping__(self) -> dict[str, Handler]:
        unary = Cardinality.UNARY_UNARY
        return {
            _PATH + "ServerLive": Handler(self.server_live, unary, pb.ServerLiveRequest, pb.ServerLiveResponse),
            _PATH + "ServerReady": Handler(self.server_ready, unary, pb.ServerReadyRequest, pb.ServerReadyResponse),
            _PATH + "ModelReady": Handler(self.model_ready, unary, pb.ModelReadyRequest, pb.ModelReadyResponse),
            _PATH + "ServerMetadata": Handler(
                self.server_metadata, unary, pb.ServerMetadataRequest, pb.ServerMetadataResponse
            ),
            _PATH + "ModelMetadata": Handler(
                self.model_metadata, unary, pb.ModelMetadataRequest, pb.ModelMetadataResponse
            ),
            _PATH + "ModelInfer": Handler(self.model_infer, unary, pb.ModelInferRequest, pb.ModelInferResponse),
            _PATH + "ModelStreamInfer": Handler(
                self.model_stream_infer, Cardinality.STREAM_STREAM, pb.ModelInferRequest, pb.ModelStreamInferResponse
            ),
            _PATH + "RepositoryIndex": Handler(
                self.repository_index, unary, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse
            ),
            _PATH + "RepositoryModelLoad": Handler(
                self.repository_load, unary, pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse
            ),
            _PATH + "RepositoryModelUnload": Handler(
                self.repository_unload, unary, pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse
            ),
        }

    async def _unary(self, stream: Any, method: str, answer: Any) -> None:
        """Receive the request, answer it with `await answer(request)`; errors become statuses."""
        async with self.calls.guard(stream, method):
            req = await stream.recv_message()
            assert req is not None  # grpclib: a unary call has its message
            try:
                response = await answer(req)
            except ModelMoraError as exc:
                raise grpc_error(exc) from None
            await stream.send_message(response)

    async def server_live(self, stream: Stream[pb.ServerLiveRequest, pb.ServerLiveResponse]) -> None:
        async def answer(req: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        await self._unary(stream, "ServerLive", answer)

    async def server_ready(self, stream: Stream[pb.ServerReadyRequest, pb.ServerReadyResponse]) -> None:
        async def answer(req: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=await self.service.ready() is None)

        await self._unary(stream, "ServerReady", answer)

    async def model_ready(self, stream: Stream[pb.ModelReadyRequest, pb.ModelReadyResponse]) -> None:
        async def answer(req: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
            return pb.ModelReadyResponse(ready=await model_ready(self.service, req.name, req.version or None))

        await self._unary(stream, "ModelReady", answer)

    async def server_metadata(self, stream: Stream[pb.ServerMetadataRequest, pb.ServerMetadataResponse]) -> None:
        async def answer(req: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=list(EXTENSIONS))

        await self._unary(stream, "ServerMetadata", answer)

    async def model_metadata(self, stream: Stream[pb.ModelMetadataRequest, pb.ModelMetadataResponse]) -> None:
        async def answer(req: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
            meta = await model_metadata(self.service, req.name, req.version or None)

            def tensors(specs: Any) -> list[pb.ModelMetadataResponseTensorMetadata]:
                return [
                    pb.ModelMetadataResponseTensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape))
                    for t in specs
                ]

            return pb.ModelMetadataResponse(
                name=meta.name,
                versions=meta.versions,
                platform=meta.platform,
                inputs=tensors(meta.inputs),
                outputs=tensors(meta.outputs),
            )

        await self._unary(stream, "ModelMetadata", answer)

    async def _infer(self, req: pb.ModelInferRequest, deadline: Deadline | None) -> pb.ModelInferResponse:
        if not req.model_name:
            raise InvalidInput("model_name is required")
        rec = await self.service.cached_model(req.model_name)
        parameters = {key: _value(p) for key, p in req.parameters.items()}
        outputs = [o.name for o in req.outputs]
        call = infer_call(
            req.model_name,
            req.model_version or None,
            TaskType(rec.task),
            _inputs(req),
            outputs,
            parameters,
            protocol=GRPC_PROTOCOL,
            trace=current_trace(),  # the call's, as `Calls.guard` found it
            identity=_caller(),
        )
        result = await self.service.infer(_bounded(call, deadline))
        tensors = output_tensors(result)
        return pb.ModelInferResponse(
            model_name=result.model_id,
            model_version=result.version,
            id=req.id,
            outputs=[
                pb.ModelInferResponseInferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in tensors
            ],
            raw_output_contents=[t.raw for t in tensors],
        )

    async def model_infer(self, stream: Stream[pb.ModelInferRequest, pb.ModelInferResponse]) -> None:
        async def answer(req: pb.ModelInferRequest) -> pb.ModelInferResponse:
            return await self._infer(req, stream.deadline)

        await self._unary(stream, "ModelInfer", answer)

    async def model_stream_infer(self, stream: Stream[pb.ModelInferRequest, pb.ModelStreamInferResponse]) -> None:
        """Requests run concurrently as they arrive; each answer (or its `error_message`) goes out when
        ready, one writer at a time. Each message after the first is charged to the token's rate
        limit; one over it is answered with its refusal and the stream goes on."""
        async with self.calls.guard(stream, "ModelStreamInfer") as context:  # type: ignore[arg-type]
            sending = anyio.Lock()

            async def answer(response: pb.ModelStreamInferResponse) -> None:
                async with sending:
                    await stream.send_message(response)

            def refusal(req: pb.ModelInferRequest, exc: ModelMoraError) -> pb.ModelStreamInferResponse:
                return pb.ModelStreamInferResponse(
                    error_message=describe_field(exc), infer_response=pb.ModelInferResponse(id=req.id)
                )

            async def run(req: pb.ModelInferRequest) -> None:
                try:
                    response = pb.ModelStreamInferResponse(infer_response=await self._infer(req, stream.deadline))
                except ModelMoraError as exc:
                    response = refusal(req, exc)
                await answer(response)

            charged = True  # admitting the call counted its first message
            async with anyio.create_task_group() as tg:
                async for req in stream:
                    if not charged and context.permit is not None:
                        try:
                            context.permit.charge()  # each message is a request for the token's rate limit
                        except RateLimited as exc:
                            tg.start_soon(answer, refusal(req, exc))
                            continue
                    charged = False
                    tg.start_soon(run, req)

    async def repository_index(self, stream: Stream[pb.RepositoryIndexRequest, pb.RepositoryIndexResponse]) -> None:
        async def answer(req: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
            entries = await repository_index(self.service, req.ready)
            return pb.RepositoryIndexResponse(
                models=[
                    pb.RepositoryIndexResponseModelIndex(name=e.name, version=e.version, state=e.state, reason=e.reason)
                    for e in entries
                ]
            )

        await self._unary(stream, "RepositoryIndex", answer)

    async def repository_load(
        self, stream: Stream[pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse]
    ) -> None:
        async def answer(req: pb.RepositoryModelLoadRequest) -> pb.RepositoryModelLoadResponse:
            if req.parameters:
                raise InvalidInput("load parameters (a model config or files) are not supported")
            await self.service.load(req.model_name, identity=_caller())
            return pb.RepositoryModelLoadResponse()

        await self._unary(stream, "RepositoryModelLoad", answer)

    async def repository_unload(
        self, stream: Stream[pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse]
    ) -> None:
        async def answer(req: pb.RepositoryModelUnloadRequest) -> pb.RepositoryModelUnloadResponse:
            await self.service.unload(req.model_name, identity=_caller())
            return pb.RepositoryModelUnloadResponse()

        await self._unary(stream, "RepositoryModelUnload", answer)
