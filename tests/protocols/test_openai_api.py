"""The OpenAI-compatible endpoints through the official `openai` client (asyncio: under trio its
streaming leaves an async generator unclosed): embeddings as the native API's, completions and chat
(streamed as incremental chunks), images, models, priority and timeout, and bad inputs in
OpenAI's error shape."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator

import httpx
import numpy as np
import openai
import pytest
from openai import AsyncOpenAI
from PIL import Image

from protocols.conftest import data_uri, native, native_embeddings, png_bytes
from serverproc import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.anyio]  # a real server process and models

TEXTS = ["hello world", "an OpenAI-compatible front end over the same core", "bonjour"]


def assert_same_vectors(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float32 rounding: a text padded to another batch's length may differ in the last bits."""
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=180) as c:
        yield c


# -- embeddings ----------------------------------------------------------------------------------


async def test_embeddings_float_and_base64_equal_the_native_api(server: ServerProcess, client: AsyncOpenAI) -> None:
    expected = native_embeddings(server, "minilm", {"text": TEXTS})
    default = await client.embeddings.create(model="minilm", input=TEXTS)  # the client asks for base64
    floats = await client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    for res in (default, floats):
        assert res.model == "minilm" and res.object == "list"
        assert [d.index for d in res.data] == [0, 1, 2]
        assert_same_vectors(np.array([d.embedding for d in res.data], dtype=np.float32), expected)
    raw = await client.embeddings.create(model="minilm", input="hello world", encoding_format="base64")
    b64 = raw.data[0].embedding
    assert isinstance(b64, str)  # asked for explicitly, the client leaves it as it came
    assert_same_vectors(
        np.frombuffer(base64.b64decode(b64), "<f4"), native_embeddings(server, "minilm", {"text": "hello world"})[0]
    )


async def test_dimensions_cut_and_renormalise(server: ServerProcess, client: AsyncOpenAI) -> None:
    full = native_embeddings(server, "minilm", {"text": TEXTS})
    res = await client.embeddings.create(model="minilm", input=TEXTS, dimensions=64)
    cut = np.array([d.embedding for d in res.data], dtype=np.float32)
    assert cut.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, rtol=1e-5)
    expected = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    assert_same_vectors(cut, expected)
    with pytest.raises(openai.BadRequestError) as too_many:
        await client.embeddings.create(model="minilm", input="x", dimensions=385)
    assert too_many.value.body == {
        "message": "dimensions 385 exceeds the model's 384",
        "type": "invalid_request_error",
        "param": "dimensions",
        "code": "invalid_input",
    }


async def test_image_embeddings_equal_the_native_api(server: ServerProcess, client: AsyncOpenAI) -> None:
    images = [data_uri(png_bytes(40, 30, seed)) for seed in (1, 2)]
    expected = native_embeddings(server, "clip", {"image": images})
    res = await client.embeddings.create(model="clip", input=images, encoding_format="float")
    assert_same_vectors(np.array([d.embedding for d in res.data], dtype=np.float32), expected)


@pytest.mark.parametrize(
    ("body", "status", "param", "code", "message"),
    [
        ({"model": "minilm", "input": [1, 2, 3]}, 400, "input", "invalid_input", "token arrays are not accepted"),
        ({"model": "minilm", "input": [[1, 2], [3]]}, 400, "input", "invalid_input", "token arrays are not accepted"),
        ({"model": "minilm", "input": []}, 400, "input", "invalid_input", "input must not be empty"),
        ({"model": "minilm", "input": ["a", 3]}, 400, "input[1]", "invalid_input", "expected a string"),
        ({"model": "minilm", "input": ["a", ""] * 5000}, 400, "input", "invalid_input", "texts exceed the limit"),
        ({"model": "nope", "input": "a"}, 404, None, "model_not_found", "model 'nope' is not installed"),
        ({"model": "sd", "input": "a"}, 400, "model", "invalid_input", "'sd' is a txt2img model"),
        ({"model": "minilm", "input": "a", "encoding_format": "hex"}, 400, "encoding_format", "invalid_input", "enum"),
        ({"model": "minilm", "input": "a", "dimensions": 0}, 400, "dimensions", "invalid_input", ">= 1"),
        ({"model": "minilm", "input": "a", "colour": 1}, 400, "colour", "invalid_input", "unknown field"),
        ({"input": "a"}, 400, None, "invalid_input", "missing required field `model`"),
        ({"model": "minilm", "input": "a", "priority": 7}, 400, "priority", "invalid_input", ""),
        ({"model": "clip", "input": ["not an image"]}, 400, "input[0]", "invalid_input", ""),
    ],
)
async def test_bad_embedding_requests(
    server: ServerProcess, body: dict[str, object], status: int, param: str | None, code: str, message: str
) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(f"{server.url}/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code), error
    assert message in error["message"], error
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")


async def test_the_client_raises_each_error_as_its_class(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.embeddings.create(model="nope", input="a")
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as tokens:
        await client.embeddings.create(model="minilm", input=[[1, 2, 3]])
    assert tokens.value.param == "input"


# -- completions and chat ------------------------------------------------------------------------


async def test_completion_equals_the_native_api_and_counts_tokens(server: ServerProcess, client: AsyncOpenAI) -> None:
    res = await client.completions.create(model="gpt2", prompt="once upon a time", max_tokens=8, temperature=0)
    params = {"max_tokens": 8, "temperature": 0}
    expected = native(server, "gpt2", {"input_data": {"text": "once upon a time"}, "parameters": params})
    assert res.object == "text_completion" and res.id.startswith("cmpl-")
    (choice,) = res.choices
    assert (choice.index, choice.text, choice.finish_reason) == (0, expected["texts"][0], expected["finish_reasons"][0])  # type: ignore[index]
    assert res.usage is not None
    assert res.usage.prompt_tokens > 0 and 0 < res.usage.completion_tokens <= 8
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens


async def test_completion_choices_per_prompt_with_a_seed(client: AsyncOpenAI) -> None:
    async def run() -> list[str]:
        res = await client.completions.create(
            model="gpt2", prompt=["once upon", "the end"], n=3, seed=7, max_tokens=6, temperature=1.0
        )
        assert [c.index for c in res.choices] == list(range(6))
        return [c.text for c in res.choices]

    first = await run()
    assert first == await run()  # seeded: reproducible
    assert len(set(first[:3])) > 1  # one seed per choice: the choices of a prompt differ
    one = await client.completions.create(model="gpt2", prompt="once upon", seed=7, max_tokens=6, temperature=1.0)
    assert one.choices[0].text == first[0]  # choice 0 runs with the seed itself


async def test_streaming_completion_with_usage(client: AsyncOpenAI) -> None:
    stream = await client.completions.create(
        model="gpt2",
        prompt=["once upon a time", "the"],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    *body, last = chunks
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens > 0
    whole = await client.completions.create(
        model="gpt2", prompt=["once upon a time", "the"], max_tokens=12, temperature=0
    )
    for index in (0, 1):
        parts = [c.choices[0] for c in body if c.choices[0].index == index]
        assert "".join(p.text for p in parts) == whole.choices[index].text
        assert [p.finish_reason for p in parts][-1] == whole.choices[index].finish_reason
    assert whole.usage == last.usage


async def test_chat_renders_the_model_template(server: ServerProcess, client: AsyncOpenAI) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    res = await client.chat.completions.create(model="gpt2-chat", messages=messages, max_tokens=10, temperature=0)  # type: ignore[arg-type]
    prompt = "<|endoftext|><|system|>be brief\n<|user|>hello\n<|assistant|>"
    expected = native(
        server,
        "gpt2",  # the same weights, given the rendered prompt
        {
            "input_data": {"text": prompt},
            "parameters": {"max_tokens": 10, "temperature": 0, "add_special_tokens": False},
        },
    )
    assert res.object == "chat.completion" and res.id.startswith("chatcmpl-")
    (choice,) = res.choices
    assert choice.message.role == "assistant"
    assert (choice.message.content, choice.finish_reason) == (expected["texts"][0], expected["finish_reasons"][0])  # type: ignore[index]
    assert res.usage is not None and res.usage.prompt_tokens > 10


async def test_streaming_chat_yields_incremental_chunks(client: AsyncOpenAI) -> None:
    messages = [{"role": "user", "content": "tell me a story"}]
    whole = await client.chat.completions.create(model="gpt2-chat", messages=messages, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    stream = await client.chat.completions.create(
        model="gpt2-chat",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    first, *middle, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in middle]
    assert len(contents) > 1 and all(contents)  # incremental: many chunks, none empty
    assert "".join(c or "" for c in contents) == whole.choices[0].message.content
    assert finish.choices[0].finish_reason == whole.choices[0].finish_reason
    assert usage.choices == [] and usage.usage == whole.usage


async def test_the_event_stream_ends_with_done(server: ServerProcess) -> None:
    body = {"model": "gpt2-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    async with (
        httpx.AsyncClient(timeout=120) as http,
        http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line async for line in r.aiter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        (
            "chat/completions",
            {"model": "gpt2", "messages": [{"role": "user", "content": "hi"}]},
            "model",
            "has no chat template",
        ),
        (
            "chat/completions",
            {"model": "gpt2-chat", "messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]},
            "messages",
            "the system message must come first",
        ),
        ("chat/completions", {"model": "gpt2-chat", "messages": []}, "messages", "length >= 1"),
        (
            "chat/completions",
            {"model": "gpt2-chat", "messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
            "unknown role",
        ),
        (
            "chat/completions",
            {
                "model": "gpt2-chat",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            },
            "messages[0].content[0]",
            "only text content parts",
        ),
        (
            "chat/completions",
            {"model": "gpt2-chat", "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
            "tools",
            "not supported",
        ),
        (
            "chat/completions",
            {"model": "gpt2-chat", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
            "logprobs",
            "not supported",
        ),
        (
            "chat/completions",
            {"model": "minilm", "messages": [{"role": "user", "content": "x"}]},
            "model",
            "a txt2embed model",
        ),
        ("completions", {"model": "gpt2", "prompt": [[1, 2]]}, "prompt", "token arrays are not accepted"),
        ("completions", {"model": "gpt2", "prompt": "x", "echo": True}, "echo", "not supported"),
        ("completions", {"model": "gpt2", "prompt": "x", "max_tokens": 5000}, "max_tokens", "<= 4096"),
        ("completions", {"model": "gpt2", "prompt": ["a", "b"], "stop": ["", "x"]}, "stop[0]", "length >= 1"),
        ("completions", {"model": "gpt2", "prompt": "x", "temperature": 3}, "temperature", "<= 2"),
        (
            "completions",
            {"model": "gpt2", "prompt": "x", "frequency_penalty": 0.5},
            "frequency_penalty",
            "not supported",
        ),
    ],
)
async def test_bad_generation_requests(
    server: ServerProcess, path: str, body: dict[str, object], param: str, message: str
) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.post(f"{server.url}/v1/{path}", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error"), error
    assert message in error["message"], error


# -- images --------------------------------------------------------------------------------------


async def test_images_inline_and_at_urls(client: AsyncOpenAI) -> None:
    inline = await client.images.generate(
        model="sd",
        prompt="a red square",
        n=2,
        size="48x40",
        response_format="b64_json",
        extra_body={"steps": 2, "seed": 3},
    )
    assert inline.data is not None and len(inline.data) == 2
    pngs = [base64.b64decode(d.b64_json or "") for d in inline.data]
    for png in pngs:
        with Image.open(io.BytesIO(png)) as image:
            assert (image.format, image.size) == ("PNG", (48, 40))
    assert pngs[0] != pngs[1]  # seed 3 and seed 4
    stored = await client.images.generate(
        model="sd", prompt="a red square", size="48x40", extra_body={"steps": 2, "seed": 3}
    )
    assert stored.data is not None and stored.data[0].url is not None and stored.data[0].b64_json is None
    async with httpx.AsyncClient(timeout=60) as http:
        fetched = await http.get(stored.data[0].url)
    assert fetched.status_code == 200 and fetched.content == pngs[0]


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"model": "sd", "prompt": "x", "size": "big"}, "size", "is not WIDTHxHEIGHT"),
        ({"model": "sd", "prompt": "x", "size": "50x40"}, "size", "multiple of 8"),
        ({"model": "sd", "prompt": "x", "n": 0}, "n", ">= 1"),
        ({"model": "sd", "prompt": "x", "response_format": "gif"}, "response_format", "enum"),
        ({"model": "minilm", "prompt": "x"}, "model", "a txt2embed model"),
    ],
)
async def test_bad_image_requests(server: ServerProcess, body: dict[str, object], param: str, message: str) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(f"{server.url}/v1/images/generations", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error


# -- models, options, the edges ------------------------------------------------------------------


async def test_models(client: AsyncOpenAI) -> None:
    listed = [m async for m in client.models.list()]
    assert sorted(m.id for m in listed) == ["clip", "gpt2", "gpt2-chat", "minilm", "sd"]
    one = await client.models.retrieve("minilm")
    assert (one.id, one.object, one.owned_by) == ("minilm", "model", "modelmora") and one.created > 0
    assert one.model_extra == {"task_type": "txt2embed"}
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.models.retrieve("nope")
    assert unknown.value.code == "model_not_found"


async def test_priority_and_timeout_as_body_fields_or_headers(server: ServerProcess, client: AsyncOpenAI) -> None:
    res = await client.embeddings.create(
        model="minilm", input="a", extra_body={"priority": "high", "timeout_seconds": 60}
    )
    assert len(res.data) == 1
    res = await client.embeddings.create(
        model="minilm", input="a", extra_headers={"X-ModelMora-Priority": "1", "X-ModelMora-Timeout-Seconds": "60"}
    )
    assert len(res.data) == 1
    with pytest.raises(openai.APIStatusError) as late:
        await client.embeddings.create(model="minilm", input=TEXTS * 50, extra_body={"timeout_seconds": 1e-6})
    assert late.value.status_code == 504 and late.value.code == "deadline_exceeded"
    async with httpx.AsyncClient(timeout=60) as http:
        for header, value in (("X-ModelMora-Priority", "urgent"), ("X-ModelMora-Timeout-Seconds", "-1")):
            r = await http.post(
                f"{server.url}/v1/embeddings", json={"model": "minilm", "input": "a"}, headers={header: value}
            )
            assert r.status_code == 400 and header.lower() in r.json()["error"]["message"], r.text


async def test_unknown_paths_methods_and_bodies(server: ServerProcess) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        missing = await http.post(f"{server.url}/v1/nothing", json={})
        wrong = await http.get(f"{server.url}/v1/embeddings")
        garbled = await http.post(
            f"{server.url}/v1/embeddings", content=b"{", headers={"Content-Type": "application/json"}
        )
        form = await http.post(f"{server.url}/v1/embeddings", data={"model": "minilm"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert garbled.status_code == 400 and garbled.json()["error"]["code"] == "malformed_request"
    assert form.status_code == 415 and form.json()["error"]["type"] == "invalid_request_error"
