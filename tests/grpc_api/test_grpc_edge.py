"""The gRPC edge without a server: servicers cover every RPC of the .proto, errors map once, the
message size limit, the settings (grpc_port on asyncio and trio)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from modelmora import errors
from modelmora._proto.modelmora import v1
from modelmora.api.grpc import (
    HealthServicer,
    InferenceServicer,
    JobServicer,
    LimitedCodec,
    ManagementServicer,
    RegistryServicer,
    decode_call,
    descriptors,
    error_message,
    proto_field,
)
from modelmora.config import DEFAULT_GRPC_PORT, load_settings
from modelmora.results.base import ResultNotFound, ResultStoreUnavailable
from modelmora.server import StartupError, check_backend


class _Generated(v1.InferenceServiceBase, v1.RegistryServiceBase, v1.ManagementServiceBase, v1.JobServiceBase):
    """The generated servicer bases, for their method table."""


def _table(mapping: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    return {path: (h.cardinality, h.request_type, h.reply_type) for path, h in mapping.items()}


def test_the_servicers_serve_every_rpc_of_the_proto_with_its_types() -> None:
    ours: dict[str, Any] = {}
    servicers = (
        InferenceServicer(None, None, ""),  # type: ignore[arg-type]
        RegistryServicer(None, None),  # type: ignore[arg-type]
        ManagementServicer(None, None),  # type: ignore[arg-type]
        JobServicer(None, None, ""),  # type: ignore[arg-type]
    )
    for servicer in servicers:
        ours.update(servicer.__mapping__())
    generated: dict[str, Any] = {}
    for base in (v1.InferenceServiceBase, v1.RegistryServiceBase, v1.ManagementServiceBase, v1.JobServiceBase):
        generated.update(base.__mapping__(_Generated()))
    assert _table(ours) == _table(generated)


def test_reflection_knows_every_service() -> None:
    pool = descriptors()
    services = ("InferenceService", "RegistryService", "ManagementService", "JobService")
    for name in (f"modelmora.v1.{s}" for s in services):
        assert pool.FindServiceByName(name).full_name == name
    assert pool.FindServiceByName("grpc.health.v1.Health")
    assert HealthServicer(None, None, []).__mapping__()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "parameters", "expected"),
    [
        ("$.input_data.text", None, "texts"),
        ("$.input_data.text[3]", None, "texts[3]"),
        ("$.input_data.image[0]", None, "images[0]"),
        ("$.parameters.max_tokens", "generation", "generation.max_tokens"),
        ("$.parameters", "caption", "caption"),
        ("$.parameters.steps", None, "parameters.steps"),
        ("$.version", None, "version"),
        ("$.return", None, "return_mode"),
        ("$.stream", None, ""),
        ("$.timeout_seconds", None, "timeout_seconds"),
        ("task_type", None, "task_type"),
        (None, None, ""),
    ],
)
def test_core_fields_become_message_paths(field: str | None, parameters: str | None, expected: str) -> None:
    assert proto_field(field, parameters) == expected


_BY_HTTP = {
    400: Status.INVALID_ARGUMENT,
    401: Status.UNAUTHENTICATED,
    403: Status.PERMISSION_DENIED,
    404: Status.NOT_FOUND,
    413: Status.INVALID_ARGUMENT,
    415: Status.INVALID_ARGUMENT,
    422: Status.INVALID_ARGUMENT,
    429: Status.RESOURCE_EXHAUSTED,
    499: Status.CANCELLED,
    503: Status.UNAVAILABLE,
    504: Status.DEADLINE_EXCEEDED,
}


@pytest.mark.parametrize(
    "cls",
    [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.ModelMoraError)]
    + [ResultNotFound, ResultStoreUnavailable],
)
def test_every_error_has_a_grpc_status_that_matches_its_http_status(cls: type[errors.ModelMoraError]) -> None:
    status = Status(int(cls.grpc_status))
    assert status == _BY_HTTP.get(cls.http_status, status)
    if cls.http_status == 500:
        assert status == Status.INTERNAL


def test_an_error_message_names_its_field_and_keeps_retry_after() -> None:
    exc = errors.QueueFull("the queue of model 'm' is full", retry_after_s=2.0)
    message = error_message(exc)
    assert (message.status, message.code, message.field, message.retry_after_s) == (8, "queue_full", "", 2.0)
    invalid = error_message(errors.InvalidInput("Expected `int` >= 1", field="$.parameters.max_tokens"), "generation")
    assert (invalid.message, invalid.field) == ("generation.max_tokens: Expected `int` >= 1", "generation.max_tokens")


def test_the_codec_refuses_large_and_malformed_messages() -> None:
    codec = LimitedCodec(1024)
    ok = v1.InferRequest(model_id="m", texts=["a"])
    assert codec.decode(bytes(ok), v1.InferRequest) == ok
    with pytest.raises(GRPCError) as big:
        codec.decode(bytes(v1.InferRequest(texts=["x" * 2000])), v1.InferRequest)
    assert big.value.status == Status.RESOURCE_EXHAUSTED
    assert big.value.message == "message of 2003 bytes exceeds the limit of 1024 bytes (grpc_max_message_bytes)"
    with pytest.raises(GRPCError) as bad:
        codec.decode(b"\x22\x03\xff\xfe\xfd", v1.InferRequest)  # texts[0] not UTF-8
    assert (bad.value.status, bad.value.message) == (Status.INVALID_ARGUMENT, "the message is not a valid InferRequest")


def test_grpc_port_defaults_to_50051_on_asyncio_and_off_on_trio() -> None:
    default = load_settings(None, environ={})
    assert (default.effective_grpc_port("asyncio"), default.effective_grpc_port("trio")) == (DEFAULT_GRPC_PORT, 0)
    check_backend(default, "trio")  # REST alone on trio
    off = load_settings(None, environ={"MODELMORA_GRPC_PORT": "0"})
    assert off.effective_grpc_port("asyncio") == 0
    explicit = load_settings(None, environ={"MODELMORA_GRPC_PORT": "6000"})
    assert explicit.effective_grpc_port("trio") == 6000
    with pytest.raises(StartupError, match=r"gRPC \(grpc_port = 6000\) runs only on the asyncio backend"):
        check_backend(explicit, "trio")
    check_backend(explicit, "asyncio")


def test_a_request_without_a_model_is_invalid() -> None:
    with pytest.raises(errors.InvalidInput) as err:
        decode_call(v1.InferRequest(texts=["x"]), None)
    assert (err.value.field, err.value.message) == ("model_id", "model_id is required")
