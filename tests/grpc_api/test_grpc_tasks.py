"""The other task types over gRPC, with tiny local models: Generate's token and progress events,
images in as encoded bytes and as raw RGB pixels, generated images inline or at a result URL."""

from __future__ import annotations

import io
from collections.abc import Iterator

import anyio
import httpx
import numpy as np
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from PIL import Image

from modelmora._proto.modelmora import v1

from grpc_api.conftest import eventually, model_status, settled
from serverproc import ServerProcess, mm
from tiny_models import build_blip, build_clip, build_gpt2, build_sd

pytestmark = [pytest.mark.slow, pytest.mark.anyio]  # a real server process and models

BUILDERS = {"gpt2": build_gpt2, "blip": build_blip, "clip": build_clip, "sd": build_sd}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    src = tmp_path_factory.mktemp("tiny-models")
    home = tmp_path_factory.mktemp("grpc-tasks-home")
    for name, build in BUILDERS.items():
        mm("install", str(build(src / name)), "--id", name, home=home)
    env = {"MODELMORA_TORCH_THREADS": "1", "MODELMORA_ZYGOTE_PRELOAD": "numpy,torch,transformers"}
    srv = ServerProcess(home, env).start()
    try:
        yield srv
    finally:
        assert srv.stop() == 0


def pixels(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def raw(array: np.ndarray) -> v1.Image:
    return v1.Image(raw=v1.RawImage(rgb=array.tobytes(), height=array.shape[0], width=array.shape[1]))


async def test_generate_text_streams_tokens_then_the_result(channel: Channel) -> None:
    request = v1.InferRequest(
        request_id="g1",
        model_id="gpt2",
        texts=["once upon a time", "the end"],
        generation=v1.GenerationParameters(max_tokens=12, temperature=0),
    )
    events = [e async for e in v1.InferenceServiceStub(channel).generate(request, timeout=180)]
    *tokens, last = events
    assert tokens and all(e.token is not None for e in tokens)
    assert last.result is not None and last.result.request_id == "g1" and last.result.texts is not None
    for index, text in enumerate(last.result.texts.texts):
        assert "".join(e.token.text for e in tokens if e.token is not None and e.token.index == index) == text
    assert set(last.result.texts.finish_reasons) <= {v1.FinishReason.STOP, v1.FinishReason.LENGTH}
    plain = await v1.InferenceServiceStub(channel).infer(
        v1.InferRequest(
            model_id="gpt2",
            texts=["once upon a time"],
            generation=v1.GenerationParameters(max_tokens=12, temperature=0),
        ),
        timeout=180,
    )
    assert plain.texts is not None and plain.texts.texts[0] == last.result.texts.texts[0]


async def test_generate_images_streams_progress_then_images(server: ServerProcess, channel: Channel) -> None:
    params = v1.ImageGenerationParameters(steps=3, seed=5, width=48, height=40)
    stub = v1.InferenceServiceStub(channel)
    events = [
        e
        async for e in stub.generate(
            v1.InferRequest(model_id="sd", texts=["a red cube"], image_generation=params), timeout=180
        )
    ]
    *progress, last = events
    assert [(e.progress.step, e.progress.steps) for e in progress if e.progress is not None] == [(1, 3), (2, 3), (3, 3)]
    assert last.result is not None and last.result.images is not None
    stored = last.result.images.images[0]
    assert stored.url.startswith(f"http://127.0.0.1:{server.port}/api/v1/results/") and stored.expires_at
    async with httpx.AsyncClient(timeout=60) as client:
        fetched = (await client.get(stored.url)).content
    inline = await stub.infer(
        v1.InferRequest(model_id="sd", texts=["a red cube"], image_generation=params, return_mode=v1.ReturnMode.INLINE),
        timeout=180,
    )
    assert inline.images is not None
    image = inline.images.images[0].png
    assert image == fetched  # the same seed, the same image
    assert Image.open(io.BytesIO(image)).size == (48, 40)


async def test_images_in_as_encoded_bytes_or_raw_pixels(channel: Channel) -> None:
    arrays = [pixels(40, 30, 1), pixels(64, 64, 2)]
    stub = v1.InferenceServiceStub(channel)
    normalize = v1.EmbeddingParameters(normalize=True)
    encoded = await stub.infer(
        v1.InferRequest(model_id="clip", images=[v1.Image(encoded=png(a)) for a in arrays], embedding=normalize),
        timeout=180,
    )
    pixels_in = await stub.infer(
        v1.InferRequest(model_id="clip", images=[raw(a) for a in arrays], embedding=normalize), timeout=180
    )
    assert encoded.embeddings is not None and pixels_in.embeddings is not None
    a = np.frombuffer(encoded.embeddings.data, "<f4").reshape(tuple(encoded.embeddings.shape))
    b = np.frombuffer(pixels_in.embeddings.data, "<f4").reshape(tuple(pixels_in.embeddings.shape))
    assert a.shape == (2, 16) and np.allclose(a, b, atol=1e-5)  # PNG is lossless: the same pixels
    caption = await stub.infer(
        v1.InferRequest(model_id="blip", images=[raw(arrays[0])], caption=v1.CaptionParameters(max_tokens=5)),
        timeout=180,
    )
    assert caption.texts is not None and len(caption.texts.texts) == 1


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (
            v1.Image(raw=v1.RawImage(rgb=b"\0" * 10, height=2, width=2)),
            "images[1]: raw RGB image of 2x2 pixels needs 12 bytes, got 10",
        ),
        (v1.Image(encoded=b"GIF89a not really"), "images[1]: "),
        (v1.Image(), "images[1]: no image: set encoded, raw or url"),
        (v1.Image(url="ftp://example.com/x.png"), "images[1].url: url must be an http(s) URL"),
        (v1.Image(url="http://127.0.0.1/x.png"), "images[1]: "),
    ],
)
async def test_bad_images_name_the_image(channel: Channel, image: v1.Image, message: str) -> None:
    request = v1.InferRequest(model_id="clip", images=[raw(pixels(8, 8, 0)), image])
    with pytest.raises(GRPCError) as err:
        await v1.InferenceServiceStub(channel).infer(request, timeout=180)
    assert err.value.status == Status.INVALID_ARGUMENT
    assert (err.value.message or "").startswith(message), err.value.message


async def test_cancelling_generate_stops_the_generation(channel: Channel) -> None:
    before = await model_status(channel, "gpt2")
    request = v1.InferRequest(
        model_id="gpt2", texts=["once"], generation=v1.GenerationParameters(max_tokens=120, temperature=0)
    )
    with anyio.move_on_after(120):
        async for event in v1.InferenceServiceStub(channel).generate(request, timeout=300):
            assert event.token is not None
            break  # the client goes away after its first token
    after = await eventually(
        lambda: model_status(channel, "gpt2"), lambda m: settled(m) and m.cancelled > before.cancelled
    )
    assert after.served == before.served  # the generation was stopped, not finished
