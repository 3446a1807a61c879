"""The naive peer: one Starlette endpoint calling `model.encode` per request, no batching.

Same request and response shape as ModelMora's `POST /api/v1/infer/{model_id}` (JSON in and
out with msgspec, so the difference from ModelMora is the batching and the process split, not
the JSON library). Each request runs `model.encode([text])` on AnyIO's default worker thread
pool (`anyio.to_thread.run_sync`, up to 40 threads), the way a web developer would write it.
Served by Hypercorn (HTTP/1.1, no access log), in this process.

    python bench/peers/naive_server.py MODEL_DIR --port 8100 [--threads 2] [--model-id all-MiniLM-L6-v2]
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import anyio.to_thread
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


class _Input(msgspec.Struct):
    text: str | list[str]


class _Params(msgspec.Struct):
    normalize: bool = False


class _Body(msgspec.Struct):
    input_data: _Input
    parameters: _Params = msgspec.field(default_factory=_Params)


def build_app(model_dir: str, model_id: str, threads: int) -> Starlette:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(model_dir, device="cpu", local_files_only=True)
    model.encode(["warm-up"])
    get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = int(get_dim() or 0)
    decoder = msgspec.json.Decoder(_Body)
    encoder = msgspec.json.Encoder()

    async def infer(request: Request) -> Response:
        if request.path_params["model_id"] != model_id:
            return Response(b'{"error":{"code":"model_not_found"}}', 404, media_type="application/json")
        try:
            body = decoder.decode(await request.body())
        except msgspec.DecodeError as exc:
            return Response(encoder.encode({"error": {"code": "invalid", "message": str(exc)}}), 422)
        texts = [body.input_data.text] if isinstance(body.input_data.text, str) else body.input_data.text
        normalize = body.parameters.normalize

        def run() -> Any:
            return model.encode(texts, normalize_embeddings=normalize, convert_to_numpy=True)

        emb = await anyio.to_thread.run_sync(run)
        out = {"model_id": model_id, "output": {"embeddings": emb.tolist(), "dim": dim}}
        return Response(encoder.encode(out), media_type="application/json")

    async def live(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(
        routes=[
            Route("/api/v1/infer/{model_id}", infer, methods=["POST"]),
            Route("/health/live", live, methods=["GET"]),
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--model-id", default="all-MiniLM-L6-v2")
    args = ap.parse_args()

    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    app = build_app(args.model_dir, args.model_id, args.threads)
    config = Config()
    config.bind = [f"{args.host}:{args.port}"]
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_timeout = 75
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    runner(serve(app, config))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
