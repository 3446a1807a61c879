"""`POST /v1/images/generations` over txt2img models.

`n` images of one prompt are `n` items of one call (with a `seed`, image j gets seed + j, each in
its own call, so the images differ and each is reproducible). `size` is "WIDTHxHEIGHT" (multiples
of 8) or "auto"; `response_format` "url" gives a signed URL from the result store, "b64_json" the
PNG inline; left out, "url" when the server stores results, else "b64_json". Our diffusion
parameters ride as extra fields: `steps`, `guidance_scale`, `negative_prompt`, `seed`.
`quality` and `style` are accepted and ignored (they name DALL-E's options).
"""

from __future__ import annotations

import base64
import re
import time
from typing import Any

import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope

from ...errors import InvalidInput, ModelMoraError
from ...results import absolute_url
from ...service import Images, InferCall, InferenceService, ReturnMode, TextInput
from ...tasks import TaskType
from .calls import infer_all, options, read_request, served_model
from .errors import Fields
from .schemas import ImageObject, ImagesRequest, ImagesResponse

__all__ = ("generate_images",)

_decoder = msgspec.json.Decoder(ImagesRequest)
_encoder = msgspec.json.Encoder()
_FIELDS = Fields("prompt", lambda i: None)
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


def _size(size: str | None) -> dict[str, int]:
    if size is None or size == "auto":
        return {}
    m = _SIZE.match(size)
    if m is None:
        raise InvalidInput(f"size {size!r} is not WIDTHxHEIGHT (e.g. 512x512) or auto", field="$.size")
    return {"width": int(m[1]), "height": int(m[2])}


async def generate_images(service: InferenceService, scope: Scope, receive: Receive, base_url: str) -> Response:
    """Raises: ModelMoraError, its field named as the body names it."""
    try:
        req = await read_request(scope, receive, _decoder, service)
        opts = options(scope, req)
        await served_model(service, req.model, (TaskType.TXT2IMG,), "/v1/images/generations")
        fmt = req.response_format or ("url" if service.results is not None else "b64_json")
        mode: ReturnMode = "url" if fmt == "url" else "inline"
        values = {
            "steps": req.steps,
            "guidance_scale": req.guidance_scale,
            "negative_prompt": req.negative_prompt,
            **_size(req.size),
        }
        params: dict[str, Any] = {k: v for k, v in values.items() if v is not None}

        def call(count: int, seed: int | None) -> InferCall:
            seeded = params if seed is None else {**params, "seed": seed}
            inputs = TextInput([req.prompt] * count)
            return opts.call(req.model, inputs, seeded, mode)

        if req.seed is None or req.n == 1:
            calls = [call(req.n, req.seed)]
        else:
            calls = [call(1, req.seed + j) for j in range(req.n)]
        results = await infer_all(service, calls, receive)
    except ModelMoraError as exc:
        raise _FIELDS.rename(exc) from None
    data = []
    for result in results:
        out = result.output
        assert isinstance(out, Images)
        for image in out.images:
            if image.png is not None:
                data.append(ImageObject(b64_json=base64.b64encode(image.png).decode("ascii")))
            else:
                data.append(ImageObject(url=absolute_url(image.url or "", base_url)))
    return Response(_encoder.encode(ImagesResponse(int(time.time()), data)), media_type="application/json")
