"""`POST /v1/embeddings` over txt2embed and img2embed models.

`input` is a string or a non-empty list of strings: texts, or for an image-embedding model images
(base64, a data URI or an http(s) URL). Token arrays are refused (400): the server tokenizes with
the model's own tokenizer, so a client's token ids could not be trusted to match it.
`encoding_format` "base64" gives each vector as base64 of little-endian float32 (what the
official client asks for when its caller did not choose, and decodes itself). `dimensions` keeps
the first values of each vector and scales it back to unit length (meaningful for models trained
for it, Matryoshka style; allowed for any). The vectors are the model's own, exactly as the
native API's with its default parameters, so both kinds of requests share batches.
"""

from __future__ import annotations

import array
import base64
import math
import sys
from typing import cast

import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope

from ...errors import InvalidInput, ModelMoraError
from ...lifecycle import TensorData
from ...service import Embeddings, ImageInput, InferenceService, TextInput
from ...tasks import TaskType
from .calls import options, read_request, served_model, until_disconnect
from .errors import Fields
from .schemas import EmbeddingObject, EmbeddingsRequest, EmbeddingsResponse, EmbeddingsUsage

__all__ = ("embeddings",)

_decoder = msgspec.json.Decoder(EmbeddingsRequest)
_encoder = msgspec.json.Encoder()
_FIELDS = Fields("input")
_TASKS = (TaskType.TXT2EMBED, TaskType.IMG2EMBED)


def _inputs(value: str | list[object]) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not value:
        raise InvalidInput("input must not be empty", field="$.input")
    if all(isinstance(v, str) for v in value):
        return [v for v in value if isinstance(v, str)]
    if all(isinstance(v, int) for v in value) or all(isinstance(v, list) for v in value):
        raise InvalidInput(
            "token arrays are not accepted: send the text (the server tokenizes it with the model's own tokenizer)",
            field="$.input",
        )
    bad = next(i for i, v in enumerate(value) if not isinstance(v, str))
    raise InvalidInput("expected a string", field=f"$.input[{bad}]")


def _truncated(vectors: TensorData, dimensions: int | None) -> list[list[float]] | None:
    """The vectors cut to `dimensions` and scaled back to unit length; None to keep them as they are.
    (Plain Python: the supervisor does not import numpy for this.)"""
    n, dim = vectors.shape
    if dimensions is None or dimensions == dim:
        return None
    if dimensions > dim:
        raise InvalidInput(f"dimensions {dimensions} exceeds the model's {dim}", field="dimensions")
    flat = memoryview(vectors.data).cast("f")
    rows = []
    for i in range(n):
        row = cast("list[float]", flat[i * dim : i * dim + dimensions].tolist())
        norm = math.sqrt(math.fsum(v * v for v in row)) or 1.0
        rows.append([v / norm for v in row])
    return rows


def _float32_bytes(row: list[float]) -> bytes:
    packed = array.array("f", row)
    if sys.byteorder == "big":  # pragma: no cover - little-endian machines
        packed.byteswap()
    return packed.tobytes()


def _data(vectors: TensorData, dimensions: int | None, encoding: str) -> list[EmbeddingObject]:
    cut = _truncated(vectors, dimensions)
    if encoding == "base64":
        raw = vectors.row_bytes() if cut is None else [_float32_bytes(row) for row in cut]
        return [EmbeddingObject(i, base64.b64encode(b).decode("ascii")) for i, b in enumerate(raw)]
    floats = vectors.rows() if cut is None else cut
    return [EmbeddingObject(i, row) for i, row in enumerate(floats)]


async def embeddings(service: InferenceService, scope: Scope, receive: Receive) -> Response:
    """Raises: ModelMoraError, its field named as the body names it."""
    try:
        req = await read_request(scope, receive, _decoder, service)
        opts = options(scope, req)
        items = _inputs(req.input)
        rec = await served_model(service, req.model, _TASKS, "/v1/embeddings")
        inputs = TextInput(items) if rec.task == TaskType.TXT2EMBED else ImageInput(items)
        call = opts.call(req.model, inputs, None)
        result = await service.infer(call, gone=lambda: until_disconnect(receive))
        assert isinstance(result.output, Embeddings)
        data = _data(result.output.vectors, req.dimensions, req.encoding_format)
    except ModelMoraError as exc:
        raise _FIELDS.rename(exc) from None
    body = EmbeddingsResponse(data, req.model, EmbeddingsUsage(0, 0))
    return Response(_encoder.encode(body), media_type="application/json")
