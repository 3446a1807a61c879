"""grpc.health.v1.Health: the standard probe (Check and Watch).

Service names: "" (the server), each of our services ("modelmora.v1.InferenceService"...) and
"grpc.health.v1.Health": SERVING while the server accepts requests (the registry answers and the
zygote has imported the model libraries: REST's /health/ready); "model/<id>": that model's active
version, SERVING unless it is `failed` (REST's /health/models; a model not loaded yet is SERVING:
it loads on the first request). An unknown name: NOT_FOUND (Check), SERVICE_UNKNOWN (Watch).
Watch sends the status, then each change, re-checking every `WATCH_INTERVAL_S`.
"""

from __future__ import annotations

import anyio
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.server import Stream

from ...errors import ModelNotFound
from ...service import InferenceService
from .calls import Calls

__all__ = ("MODEL_PREFIX", "WATCH_INTERVAL_S", "HealthServicer")

MODEL_PREFIX = "model/"
"""Health service names of models: "model/<model id>"."""
WATCH_INTERVAL_S = 1.0

_PATH = "/grpc.health.v1.Health/"
_SERVING = HealthCheckResponse.SERVING
_NOT_SERVING = HealthCheckResponse.NOT_SERVING
_UNKNOWN = HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer:
    """Health of the server (`services`: the names that report it) and of each model."""

    def __init__(self, service: InferenceService, calls: Calls, services: list[str]) -> None:
        self.service = service
        self.calls = calls
        self.services = {"", "grpc.health.v1.Health", *services}

    def __mapping__(self) -> dict[str, Handler]:
        return {
            _PATH + "Check": Handler(self.check, Cardinality.UNARY_UNARY, HealthCheckRequest, HealthCheckResponse),
            _PATH + "Watch": Handler(self.watch, Cardinality.UNARY_STREAM, HealthCheckRequest, HealthCheckResponse),
        }

    async def status(self, name: str) -> HealthCheckResponse.ServingStatus.ValueType:
        """The serving status of a service name (SERVICE_UNKNOWN for a name we do not serve)."""
        if name in self.services:
            return _SERVING if await self.service.ready() is None else _NOT_SERVING
        if name.startswith(MODEL_PREFIX):
            model_id = name.removeprefix(MODEL_PREFIX)
            try:
                rec = await self.service.model(model_id)
            except ModelNotFound:
                return _UNKNOWN
            health = await self.service.health()
            for h in health.models:
                if h.model_id == model_id and h.version == rec.active_version:
                    return _SERVING if h.healthy else _NOT_SERVING
            return _SERVING
        return _UNKNOWN

    async def check(self, stream: Stream[HealthCheckRequest, HealthCheckResponse]) -> None:
        async with self.calls.guard(stream, "Health.Check"):  # type: ignore[arg-type]
            req = await stream.recv_message()
            assert req is not None
            status = await self.status(req.service)
            if status == _UNKNOWN:
                raise GRPCError(Status.NOT_FOUND, f"unknown service {req.service!r}")
            await stream.send_message(HealthCheckResponse(status=status))

    async def watch(self, stream: Stream[HealthCheckRequest, HealthCheckResponse]) -> None:
        async with self.calls.guard(stream, "Health.Watch"):  # type: ignore[arg-type]
            req = await stream.recv_message()
            assert req is not None
            last = None
            while not self.calls.closing:  # a stopping server ends its watches
                status = await self.status(req.service)
                if status != last:
                    await stream.send_message(HealthCheckResponse(status=status))
                    last = status
                await anyio.sleep(WATCH_INTERVAL_S)
