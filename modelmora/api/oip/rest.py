"""The Open Inference Protocol's REST form, under `/v2`, served straight from ASGI:

    GET  /v2                                                server metadata
    GET  /v2/health/live, /v2/health/ready
    GET  /v2/models/{name}[/versions/{v}]                   model metadata (typed inputs and outputs)
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer
    POST /v2/repository/index                               {"ready": bool} optional
    POST /v2/repository/models/{name}/load, .../unload

Inference takes JSON, or the binary tensor data extension: the JSON header's length in
`Inference-Header-Content-Length`, then each input whose parameters give `binary_data_size`, in
order. Outputs are binary when the request's `binary_data_output` parameter or an output's
`binary_data` parameter says so (what Triton's clients ask for), else JSON `data` (FP32 as
numbers, texts as strings, PNGs as base64). Errors are `{"error": "..."}`: 400 for a bad request
(our 422 too), 404 for an unknown model or version, and our own statuses otherwise.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Any

import anyio
import msgspec
import structlog
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ...errors import (
    ClientGone,
    InvalidInput,
    MalformedRequest,
    ModelMoraError,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from ...service import InferenceService
from ...tasks import TaskType
from ..rest.body import decode
from ..rest.edge import identity_of, trace_of
from ..rest.errors import EndpointNotFound, MethodNotAllowed, refusal_headers
from .models import EXTENSIONS, SERVER_NAME, model_metadata, model_ready, repository_index, server_version
from .tensors import REST_PROTOCOL, InputTensor, OutputTensor, describe_field, infer_call, output_tensors

__all__ = ("HEADER_LENGTH", "PREFIX", "create_oip_app", "error_response")

log = structlog.get_logger("modelmora.api.oip")

PREFIX = "/v2"
HEADER_LENGTH = "inference-header-content-length"

_MODEL = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?:/(?P<action>ready|infer))?$")
_REPOSITORY = re.compile(r"^/v2/repository/models/(?P<name>[^/]+)/(?P<action>load|unload)$")
_encoder = msgspec.json.Encoder()
_ACCEPTED = ("application/json", "application/octet-stream")


class _Tensor(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = {}
    data: Any = None


class _Output(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    parameters: dict[str, Any] = {}


class _InferRequest(msgspec.Struct, forbid_unknown_fields=True):
    inputs: list[_Tensor]
    id: str | None = None
    parameters: dict[str, Any] = {}
    outputs: list[_Output] | None = None


class _IndexRequest(msgspec.Struct, forbid_unknown_fields=True):
    repository_name: str = ""
    ready: bool = False


_infer_decoder = msgspec.json.Decoder(_InferRequest)
_index_decoder = msgspec.json.Decoder(_IndexRequest)


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(obj), status_code=status, media_type="application/json", headers=headers)


def error_response(exc: ModelMoraError) -> Response:
    """`{"error": message}`, the tensor or parameter at fault named in the message (the
    `ErrorEncoder` of every path under `/v2`, the gate's refusals too)."""
    status = 400 if exc.http_status == 422 else exc.http_status
    return _json({"error": describe_field(exc)}, status, refusal_headers(exc))


async def _read(scope: Scope, receive: Receive, service: InferenceService) -> tuple[bytes, int | None]:
    """The body, and the JSON header's length when the binary extension is used."""
    content_type = header_length = declared = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value.decode("latin-1").partition(";")[0].strip().lower()
        elif name == b"content-length":
            declared = value
        elif name == HEADER_LENGTH.encode():
            header_length = value.decode("latin-1").strip()
    if content_type is not None and content_type not in _ACCEPTED:
        raise UnsupportedMediaType(f"Content-Type {content_type!r} is not accepted; send {' or '.join(_ACCEPTED)}")
    limit = service.settings.max_body_bytes
    if declared is not None and declared.isdigit() and int(declared) > limit:  # refused before it is read
        raise PayloadTooLarge(
            f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes (max_body_bytes)"
        )
    body = bytearray()
    with anyio.move_on_after(service.settings.body_read_timeout_s):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise MalformedRequest("the client went away before sending the whole body")
            body += message.get("body", b"")
            if len(body) > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes (max_body_bytes)")
            if not message.get("more_body", False):
                break
        length = None
        if header_length is not None:
            if not header_length.isdigit() or int(header_length) > len(body):
                raise MalformedRequest(f"{HEADER_LENGTH} {header_length!r} does not fit the body of {len(body)} bytes")
            length = int(header_length)
        return bytes(body), length
    raise RequestTimeout(
        f"the request body did not arrive within {service.settings.body_read_timeout_s:g} s (body_read_timeout_s)"
    )


def _inputs(req: _InferRequest, binary: bytes) -> list[InputTensor]:
    out, pos = [], 0
    for tensor in req.inputs:
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            if tensor.data is None:
                raise InvalidInput(f"input {tensor.name!r} has neither data nor binary_data_size")
            out.append(InputTensor(tensor.name, tensor.datatype, tensor.shape, data=tensor.data))
            continue
        if not isinstance(size, int) or size < 0 or pos + size > len(binary):
            raise InvalidInput(f"input {tensor.name!r}: binary_data_size {size!r} runs past the body")
        out.append(InputTensor(tensor.name, tensor.datatype, tensor.shape, raw=binary[pos : pos + size]))
        pos += size
    if pos != len(binary):
        raise InvalidInput(f"{len(binary) - pos} bytes of binary data follow the inputs")
    return out


def _json_data(tensor: OutputTensor) -> list[Any]:
    if tensor.elements is None:
        return memoryview(tensor.raw).cast("f").tolist()
    try:
        return [e.decode("utf-8") for e in tensor.elements]
    except UnicodeDecodeError:
        return [base64.b64encode(e).decode("ascii") for e in tensor.elements]


async def _infer(service: InferenceService, scope: Scope, receive: Receive, name: str, version: str | None) -> Response:
    trace, t0 = trace_of(scope), time.perf_counter()
    try:
        body, header_length = await _read(scope, receive, service)
        head, binary = (body, b"") if header_length is None else (body[:header_length], body[header_length:])
        req = decode(_infer_decoder, head)
    except ModelMoraError as exc:  # refused before the core saw it: counted here, as the native API counts it
        service.record.failed("", "", REST_PROTOCOL, exc, time.perf_counter() - t0, trace)
        raise
    rec = await service.cached_model(name)
    outputs = [o.name for o in req.outputs or []]
    call = infer_call(
        name,
        version,
        TaskType(rec.task),
        _inputs(req, binary),
        outputs,
        req.parameters,
        protocol=REST_PROTOCOL,
        trace=trace,
        identity=identity_of(scope),
    )

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    result = await service.infer(call, gone=gone)
    binary_all = req.parameters.get("binary_data_output") is True
    wanted = {o.name: o.parameters.get("binary_data") for o in req.outputs or []}
    described, chunks = [], []
    for tensor in output_tensors(result):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if wanted.get(tensor.name, binary_all) is True:
            entry["parameters"] = {"binary_data_size": len(tensor.raw)}
            chunks.append(tensor.raw)
        else:
            entry["data"] = _json_data(tensor)
        described.append(entry)
    answer: dict[str, Any] = {"model_name": result.model_id, "model_version": result.version, "outputs": described}
    if req.id is not None:
        answer["id"] = req.id
    header = _encoder.encode(answer)
    if not chunks:
        return Response(header, media_type="application/json")
    headers = {"Inference-Header-Content-Length": str(len(header))}
    return Response(b"".join([header, *chunks]), media_type="application/octet-stream", headers=headers)


async def _index(service: InferenceService, scope: Scope, receive: Receive) -> Response:
    body, _ = await _read(scope, receive, service)
    req = decode(_index_decoder, body) if body.strip() else _IndexRequest()
    entries = await repository_index(service, req.ready)
    return _json([{"name": e.name, "version": e.version, "state": e.state, "reason": e.reason} for e in entries])


def create_oip_app(service: InferenceService) -> ASGIApp:
    """The ASGI application for `/v2` and the paths under it."""

    async def route(scope: Scope, receive: Receive) -> Response:
        path, method = scope["path"], scope["method"]
        get = method in ("GET", "HEAD")
        if path in ("/v2", "/v2/"):
            if not get:
                return _not_allowed("GET")
            return _json({"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)})
        if path == "/v2/health/live":
            return _json({"live": True}) if get else _not_allowed("GET")
        if path == "/v2/health/ready":
            if not get:
                return _not_allowed("GET")
            ready = await service.ready() is None
            return _json({"ready": ready}, 200 if ready else 503)
        if path == "/v2/repository/index":
            return await _index(service, scope, receive) if method == "POST" else _not_allowed("POST")
        if (m := _REPOSITORY.match(path)) is not None:
            if method != "POST":
                return _not_allowed("POST")
            await _read(scope, receive, service)  # a body, if any, holds parameters we do not take
            if m["action"] == "load":
                await service.load(m["name"], identity=identity_of(scope))
            else:
                await service.unload(m["name"], identity=identity_of(scope))
            return Response(status_code=200)
        if (m := _MODEL.match(path)) is not None:
            name, version, action = m["name"], m["version"], m["action"]
            if action == "infer":
                if method != "POST":
                    return _not_allowed("POST")
                return await _infer(service, scope, receive, name, version)
            if not get:
                return _not_allowed("GET")
            if action == "ready":
                ready = await model_ready(service, name, version)
                return _json({"name": name, "ready": ready}, 200 if ready else 503)
            meta = await model_metadata(service, name, version)
            return _json(
                {
                    "name": meta.name,
                    "versions": meta.versions,
                    "platform": meta.platform,
                    "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.inputs],
                    "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.outputs],
                }
            )
        raise EndpointNotFound(f"no such endpoint: {method} {path}")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await route(scope, receive)
        except ClientGone:
            response = Response(status_code=499)  # nobody is listening; for the access log only
        except ModelMoraError as exc:
            response = error_response(exc)
        except Exception as exc:
            response = _unexpected(scope.get("path", ""), exc, trace_of(scope).trace_id)
        await response(scope, receive, send)

    return app


def _not_allowed(allowed: str) -> Response:
    return error_response(MethodNotAllowed(f"method not allowed here; use {allowed}", allow=allowed))


def _unexpected(path: str, exc: BaseException, trace_id: str) -> Response:
    """A 500 naming the trace id (the request's) under which `exc` is logged."""
    log.error("unhandled_error", trace_id=trace_id, path=path, exc_info=exc)
    return _json({"error": f"internal error (trace id {trace_id})"}, 500)
