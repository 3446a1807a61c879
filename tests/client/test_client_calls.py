"""Every `AsyncClient` method against `mm serve`: MiniLM embeddings equal REST's, the tiny models for
images in, captions, text and image generation (whole and streamed), the registry and load/unload/
status; errors as the `ClientError` family with the server's code and field; deadlines."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest
from PIL import Image

from client.conftest import SPARE
from modelmora.client import (
    AsyncClient,
    ClientError,
    DeadlineExceededError,
    DeletedModel,
    GeneratedImage,
    ImageResult,
    InvalidArgumentError,
    NotFoundError,
    PriorityName,
    Progress,
    Status,
    StreamAnswer,
    StreamRequest,
    TextResult,
    Token,
)

from serverproc import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.anyio]  # a real server process and models

MINILM = "minilm"
TEXTS = ["hello world", "the Python client over gRPC", "bonjour"]


def pixels(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


async def test_embed_equals_rest(server: ServerProcess, target: str) -> None:
    async with AsyncClient(target, timeout=120) as client:
        got = await client.embed(MINILM, TEXTS, normalize=True)
        one = await client.embed(MINILM, "hello world", normalize=True, priority="high")
    assert got.dtype == np.float32 and got.shape == (3, 384) and got.flags.writeable
    assert one.shape == (1, 384) and np.allclose(one[0], got[0], atol=1e-6)
    body = {"input_data": {"text": TEXTS}, "parameters": {"normalize": True}}
    async with httpx.AsyncClient(timeout=120) as http:
        rest = np.array(
            (await http.post(f"{server.url}/api/v1/infer/{MINILM}", json=body)).json()["output"]["embeddings"]
        )
    cosine = (got * rest).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(rest, axis=1))
    assert (cosine >= 0.9999).all(), cosine
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


async def test_embed_images_as_array_png_path_or_pil(target: str, tmp_path: Path) -> None:
    arrays = [pixels(40, 30, 1), pixels(64, 64, 2)]
    path = tmp_path / "one.png"
    path.write_bytes(png(arrays[0]))
    async with AsyncClient(target, timeout=180) as client:
        raw = await client.embed("clip", images=arrays, normalize=True)
        encoded = await client.embed("clip", images=[png(a) for a in arrays], normalize=True)
        mixed = await client.embed("clip", images=[path, Image.fromarray(arrays[1])], normalize=True)
        single = await client.embed("clip", images=arrays[0], normalize=True)  # one array is one image
    assert raw.shape == (2, 16)
    assert np.allclose(raw, encoded, atol=1e-5) and np.allclose(raw, mixed, atol=1e-5)  # PNG is lossless
    assert single.shape == (1, 16) and np.allclose(single[0], raw[0], atol=1e-5)


async def test_caption_images(target: str) -> None:
    image = pixels(48, 32, 3)
    async with AsyncClient(target, timeout=180) as client:
        result = await client.caption("blip", [image, png(image)], max_tokens=5)
    assert isinstance(result, TextResult) and len(result.texts) == 2
    assert result.texts[0] == result.texts[1] == result.text  # greedy, the same pixels
    assert (result.model_id, result.version) == ("blip", "1.0.0")
    assert set(result.finish_reasons) <= {"stop", "length"}
    assert result.timing.total_ms >= result.timing.inference_ms > 0


async def test_generate_whole_and_streamed(target: str) -> None:
    async with AsyncClient(target, timeout=180) as client:
        whole = await client.generate("gpt2", "once upon a time", max_tokens=12, temperature=0)
        events = [
            e
            async for e in client.generate_stream("gpt2", ["once upon a time", "the end"], max_tokens=12, temperature=0)
        ]
    *tokens, last = events
    assert tokens and all(isinstance(e, Token) for e in tokens)
    assert isinstance(last, TextResult) and len(last.texts) == 2
    for index, text in enumerate(last.texts):
        assert "".join(t.text for t in tokens if isinstance(t, Token) and t.index == index) == text
    assert last.texts[0] == whole.text  # greedy: the same text, whole or streamed
    assert whole.finish_reasons[0] in {"stop", "length"}


async def test_generate_images_inline_at_a_url_and_streamed(server: ServerProcess, target: str) -> None:
    options = {"steps": 2, "seed": 5, "width": 32, "height": 24}
    async with AsyncClient(target, timeout=180) as client:
        inline = await client.generate_image("sd", "a red cube", return_mode="inline", **options)  # type: ignore[arg-type]
        stored = await client.generate_image("sd", "a red cube", return_mode="url", **options)  # type: ignore[arg-type]
        events = [e async for e in client.generate_image_stream("sd", "a red cube", return_mode="inline", **options)]  # type: ignore[arg-type]
    image = inline.images[0]
    assert image.png is not None and image.url is None
    assert Image.open(io.BytesIO(image.png)).size == (32, 24)
    url = stored.images[0]
    assert url.png is None and url.url is not None and url.url.startswith(f"{server.url}/api/v1/results/")
    assert url.expires_at is not None
    async with httpx.AsyncClient(timeout=60) as http:
        assert (await http.get(url.url)).content == image.png  # the same seed, the same image
    *progress, last = events
    assert progress == [Progress(0, 1, 2), Progress(0, 2, 2)]
    assert isinstance(last, ImageResult) and last.images == (GeneratedImage(png=image.png),)


async def test_registry_and_management(target: str) -> None:
    async with AsyncClient(target, timeout=180) as client:
        models = await client.models()
        embedders = await client.models("txt2embed")
        info = await client.model(MINILM)
        loaded = await client.load(MINILM)
        status = await client.status()
        unloaded = await client.unload(MINILM)
    assert sorted(m.id for m in models if m.id != SPARE) == ["blip", "clip", "gpt2", MINILM, "sd"]
    assert [m.id for m in embedders if m.id != SPARE] == [MINILM]
    assert (info.task_type, info.active_version, info.versions[0].version) == ("txt2embed", "1.0.0", "1.0.0")
    assert info.versions[0].files > 0 and info.settings.pinned is None
    assert (loaded.model_id, loaded.state, loaded.task_type) == (MINILM, "ready", "txt2embed")
    assert loaded.worker_pid is not None and loaded.worker_pid > 0
    assert status.supervisor_pid > 0 and not status.raw.supervisor.torch_imported
    assert any(m.model_id == MINILM and m.state == "ready" for m in status.models)
    assert unloaded.state == "cached" and unloaded.worker_pid is None


async def test_server_errors_carry_status_code_and_field(target: str) -> None:
    async with AsyncClient(target, timeout=180) as client:
        with pytest.raises(NotFoundError) as missing:
            await client.embed("nope", "x")
        with pytest.raises(InvalidArgumentError) as too_long:
            await client.embed(MINILM, ["fine", "x" * 200_000])
        with pytest.raises(InvalidArgumentError) as bad_parameter:
            await client.generate("gpt2", "x", max_tokens=100_000)
        with pytest.raises(NotFoundError) as no_version:
            await client.load(MINILM, "9.9.9")
    err = missing.value
    assert (err.status, err.code, err.field, err.attempts) == (Status.NOT_FOUND, "model_not_found", None, 1)
    assert "'nope'" in err.message and str(err).startswith("NOT_FOUND [model_not_found]: ")
    assert (too_long.value.status, too_long.value.field) == (Status.INVALID_ARGUMENT, "texts[1]")
    assert too_long.value.message.startswith("texts[1]: ") and isinstance(too_long.value, ValueError)
    assert bad_parameter.value.field == "generation.max_tokens"
    assert no_version.value.status == Status.NOT_FOUND


async def test_deadline_exceeded_is_a_client_error(target: str) -> None:
    async with AsyncClient(target) as client:
        await client.load("sd", timeout=180)
        with pytest.raises(DeadlineExceededError) as during:  # the deadline passes while it denoises
            await client.generate_image("sd", "a red cube", steps=200, width=64, height=64, timeout=0.05)
        with pytest.raises(DeadlineExceededError) as before:
            await client.embed(MINILM, "x", timeout=1e-9)
    for err in (during.value, before.value):
        assert err.status == Status.DEADLINE_EXCEEDED and err.attempts == 1 and isinstance(err, TimeoutError)
        assert isinstance(err, ClientError)


async def test_update_settings_and_delete_model(target: str) -> None:
    async with AsyncClient(target, timeout=180) as client:
        updated = await client.update_settings(SPARE, max_batch_size=8, keep_alive="5m", pinned=False)
        assert (await client.model(SPARE)).settings == updated.settings
        reset = await client.update_settings(SPARE)  # nothing given: every setting back to the default
        with pytest.raises(InvalidArgumentError) as bad:
            await client.update_settings(SPARE, keep_alive="soon")
        await client.load(SPARE)
        deleted = await client.delete_model(SPARE)
        with pytest.raises(NotFoundError) as gone:
            await client.model(SPARE)
        with pytest.raises(NotFoundError) as again:
            await client.delete_model(SPARE)
        with pytest.raises(NotFoundError):
            await client.update_settings(SPARE, max_batch_size=4)
    assert updated.id == SPARE and updated.task_type == "txt2embed"
    assert (updated.settings.max_batch_size, updated.settings.keep_alive, updated.settings.pinned) == (8, "5m", False)
    assert reset.settings.max_batch_size is None and reset.settings.keep_alive is None
    assert bad.value.field == "settings.keep_alive" and bad.value.message.startswith("settings.keep_alive: ")
    assert deleted == DeletedModel(SPARE, ("1.0.0",))
    assert gone.value.code == again.value.code == "model_not_found" and again.value.attempts == 1


async def test_infer_stream_answers_every_request_once(target: str) -> None:
    texts = [f"sentence number {i}" for i in range(200)]
    priorities: list[PriorityName | None] = ["critical", "high", "normal", "low", None]
    requests = [
        StreamRequest.embed(f"e{i}", MINILM, t, normalize=True, priority=priorities[i % 5], timeout_s=120)
        for i, t in enumerate(texts)
    ]
    requests.insert(100, StreamRequest.embed("missing", "nope", "x"))
    requests.append(StreamRequest.generate("g", "gpt2", "once upon a time", max_tokens=6, temperature=0))

    async def slowly() -> AsyncIterator[StreamRequest]:  # an async source, sending as it produces
        for r in requests:
            yield r

    async with AsyncClient(target, timeout=300) as client:
        answers = [a async for a in client.infer_stream(slowly())]
        direct = await client.embed(MINILM, texts[:3], normalize=True)
        whole = await client.generate("gpt2", "once upon a time", max_tokens=6, temperature=0)
    assert all(isinstance(a, StreamAnswer) for a in answers)
    ids = [a.request_id for a in answers]
    assert len(ids) == len(set(ids)) == 202
    by_id = {a.request_id: a for a in answers}
    missing = by_id["missing"]
    assert not missing.ok and isinstance(missing.error, NotFoundError) and missing.error.code == "model_not_found"
    with pytest.raises(NotFoundError):
        missing.value()
    rows = np.concatenate([np.asarray(by_id[f"e{i}"].value()) for i in range(3)])
    assert rows.shape == (3, 384) and np.allclose(rows, direct, atol=1e-5)
    assert all(by_id[f"e{i}"].ok for i in range(200))
    generated = by_id["g"].value()
    assert isinstance(generated, TextResult) and generated.text == whole.text


async def test_infer_stream_refuses_bad_requests_and_leaving_early_withdraws_the_rest(target: str) -> None:
    with pytest.raises(InvalidArgumentError) as no_id:
        StreamRequest.embed("", MINILM, "x")
    assert no_id.value.field == "request_id" and no_id.value.attempts == 0
    async with AsyncClient(target, timeout=300) as client:
        with pytest.raises(TypeError, match="StreamRequest"):
            async for _ in client.infer_stream([StreamRequest.embed("ok", MINILM, "x"), "not a request"]):  # type: ignore[list-item]
                pass
        await client.load(MINILM)
        before = next(m for m in (await client.status()).models if m.model_id == MINILM)
        many = [StreamRequest.embed(str(i), MINILM, ["w " * 200] * 4) for i in range(300)]
        async for answer in client.infer_stream(many):
            assert answer.ok
            break  # the call is cancelled: the requests still queued are withdrawn
        for _ in range(600):  # a safety net, not a performance bound
            after = next(m for m in (await client.status()).models if m.model_id == MINILM)
            if after.queue_depth == 0 and not after.busy and after.raw.cancelled > before.raw.cancelled:
                break
            await anyio.sleep(0.05)
    assert after.queue_depth == 0 and after.raw.cancelled > before.raw.cancelled
    assert after.served - before.served < 300  # the withdrawn requests never ran
