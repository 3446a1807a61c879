"""The gRPC listener: grpclib's server with our servicers, health and reflection, on a socket bound
by `modelmora.server` (asyncio only: grpclib does not run on trio).

Messages larger than `grpc_max_message_bytes` are refused with RESOURCE_EXHAUSTED (checked when the
message has arrived: grpclib reads a whole message before decoding it); a message that does not
parse is INVALID_ARGUMENT. A graceful stop refuses new calls (UNAVAILABLE), lets running ones end
within `shutdown_grace_s`, then cancels the rest.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import anyio
import anyio.abc
import structlog
from google.protobuf import descriptor_pb2, descriptor_pool
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.health.v1 import health_pb2
from grpclib.reflection.service import ServerReflection
from grpclib.reflection.v1 import reflection_pb2
from grpclib.reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2
from grpclib.server import Server
from grpclib.utils import _service_name

from ...jobs import JobRunner
from ...service import InferenceService
from .calls import Calls
from .health import HealthServicer
from .inference import InferenceServicer
from .jobs import JobServicer
from .models import ManagementServicer, RegistryServicer

__all__ = ("GrpcListener", "LimitedCodec", "descriptors")

log = structlog.get_logger("modelmora.api.grpc")


class LimitedCodec(ProtoCodec):
    """Protobuf (and betterproto2) messages, refusing received messages over `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def decode(self, data: bytes, message_type: Any) -> Any:
        if len(data) > self.max_bytes:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"message of {len(data)} bytes exceeds the limit of {self.max_bytes} bytes (grpc_max_message_bytes)",
            )
        try:
            return super().decode(data, message_type)
        except Exception:
            name = getattr(message_type, "__name__", "message")
            raise GRPCError(Status.INVALID_ARGUMENT, f"the message is not a valid {name}") from None


def descriptors() -> descriptor_pool.DescriptorPool:
    """The file descriptors reflection answers from: ours (`descriptors.binpb`, written by `just proto`),
    health and reflection."""
    pool = descriptor_pool.DescriptorPool()
    files = descriptor_pb2.FileDescriptorSet.FromString(
        resources.files("modelmora._proto").joinpath("descriptors.binpb").read_bytes()
    )
    for module in (health_pb2, reflection_pb2, reflection_v1alpha_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    for file in files.file:
        pool.Add(file)
    return pool


class GrpcListener:
    """Serves the gRPC services over `service` on the listening socket `sock`."""

    def __init__(
        self, service: InferenceService, sock: socket.socket, base_url: str, jobs: JobRunner | None = None
    ) -> None:
        self.service = service
        self.sock = sock
        self.calls = Calls()
        ours: list[Any] = [
            InferenceServicer(service, self.calls, base_url),
            RegistryServicer(service, self.calls),
            ManagementServicer(service, self.calls),
        ]
        if jobs is not None:
            ours.append(JobServicer(jobs, self.calls, base_url))
        health = HealthServicer(service, self.calls, [_service_name(s) for s in ours])
        self.handlers = ServerReflection.extend([*ours, health], pool=descriptors())

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def serve(
        self,
        until: Callable[[], Awaitable[object]],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until `until()` returns (or this task is cancelled), then stop gracefully."""
        server = Server(self.handlers, codec=LimitedCodec(self.service.settings.grpc_max_message_bytes))
        await server.start(sock=self.sock)
        task_status.started()
        try:
            await until()
        finally:
            with anyio.CancelScope(shield=True):
                self.calls.closing = True
                with anyio.move_on_after(self.service.settings.shutdown_grace_s):
                    await self.calls.wait_idle()
                log.info("grpc_stopping", running_calls=self.calls.running)
                server.close()
                await server.wait_closed()
