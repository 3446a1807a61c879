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
from ssl import SSLContext
from typing import Any

import anyio
import anyio.abc
import structlog
from google.protobuf import descriptor_pb2, descriptor_pool
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.health.v1 import health_pb2
from grpclib.protocol import H2Protocol
from grpclib.reflection.service import ServerReflection
from grpclib.reflection.v1 import reflection_pb2
from grpclib.reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2
from grpclib.server import Server
from grpclib.utils import _service_name

from ...jobs import JobRunner
from ...security import Gate
from ...service import InferenceService
from ..oip.grpc import OipServicer
from .calls import Calls
from .gate import guarded
from .health import HealthServicer
from .inference import InferenceServicer
from .jobs import JobServicer
from .models import ManagementServicer, RegistryServicer
from .wire import CoalescingProtocol

__all__ = ("GrpcListener", "LimitedCodec", "descriptors")

log = structlog.get_logger("modelmora.api.grpc")


class LimitedCodec(ProtoCodec):
    """Protobuf (and betterproto2) messages, refusing received messages over `max_bytes`; an answer
    given as bytes is already encoded (`wire.infer_response_bytes`) and goes out as it is."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def encode(self, message: Any, message_type: Any) -> bytes:
        if type(message) is bytes:
            return message
        return super().encode(message, message_type)

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


class _Guarded:
    """A servicer's handlers behind the gate (grpclib asks each servicer for its `__mapping__`)."""

    def __init__(self, servicer: Any, gate: Gate) -> None:
        self.servicer = servicer
        self.mapping = guarded(servicer.__mapping__(), gate)

    def __mapping__(self) -> dict[str, Any]:
        return self.mapping


class _Server(Server):
    """grpclib's server, its connections over `CoalescingProtocol` (one socket write per loop turn)."""

    def _protocol_factory(self) -> H2Protocol:
        made = super()._protocol_factory()
        return CoalescingProtocol(made.handler, made.config, made.h2_config)


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
    """Serves the gRPC services over `service` on the listening socket `sock`, behind `gate` (default:
    one from the `[auth]` settings), over TLS when `ssl` is given (its ALPN must offer "h2").

    Raises:
        KeyError: a served method is missing from the access table (`api.access.GRPC_ACCESS`).
    """

    def __init__(
        self,
        service: InferenceService,
        sock: socket.socket,
        base_url: str,
        *,
        gate: Gate | None = None,
        ssl: SSLContext | None = None,
        jobs: JobRunner | None = None,
    ) -> None:
        self.service = service
        self.sock = sock
        self.ssl = ssl
        self.gate = gate if gate is not None else Gate(service.settings.auth)
        self.calls = Calls()
        ours: list[Any] = [
            InferenceServicer(service, self.calls, base_url),
            RegistryServicer(service, self.calls),
            ManagementServicer(service, self.calls),
            OipServicer(service, self.calls),  # the Open Inference Protocol's
        ]
        if jobs is not None:
            ours.append(JobServicer(jobs, self.calls, base_url))
        health = HealthServicer(service, self.calls, [_service_name(s) for s in ours])
        self.handlers = [_Guarded(h, self.gate) for h in ServerReflection.extend([*ours, health], pool=descriptors())]

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def serve(
        self,
        until: Callable[[], Awaitable[object]],
        *,
        forced: Callable[[], Awaitable[object]] | None = None,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until `until()` returns (or this task is cancelled), then stop gracefully: calls
        started from then on get UNAVAILABLE, running ones end or are cancelled when `forced()`
        returns (default: after `shutdown_grace_s`)."""
        server = _Server(self.handlers, codec=LimitedCodec(self.service.settings.grpc_max_message_bytes))
        await server.start(sock=self.sock, ssl=self.ssl)
        task_status.started()
        try:
            await until()
        finally:
            with anyio.CancelScope(shield=True):
                self.calls.closing = True
                async with anyio.create_task_group() as drain:
                    drain.start_soon(_cancel_after, drain.cancel_scope, self.calls.wait_idle)
                    if forced is not None:
                        drain.start_soon(_cancel_after, drain.cancel_scope, forced)
                    else:
                        drain.cancel_scope.deadline = anyio.current_time() + self.service.settings.shutdown_grace_s
                log.info("grpc_stopping", running_calls=self.calls.running)
                server.close()
                await server.wait_closed()


async def _cancel_after(scope: anyio.CancelScope, wait: Callable[[], Awaitable[object]]) -> None:
    await wait()
    scope.cancel()
