"""The Open Inference Protocol through Triton's own clients (`tritonclient.http` and `.grpc`, and
the grpc asyncio client): health, metadata, inference for every task type (embeddings equal the
native API's), the repository extension, priority and timeout, and bad inputs in each form's
shape (HTTP status and `{"error"}` body; gRPC status)."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from protocols.conftest import native, native_embeddings, png_bytes
from serverproc import ServerProcess

pytestmark = pytest.mark.slow  # a real server process and models

TEXTS = ["hello world", "an inference protocol over the same core", "bonjour"]


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=180)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def grpc(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        yield client
    finally:
        client.close()


Client = httpclient.InferenceServerClient | grpcclient.InferenceServerClient
FORMS = ["http", "grpc"]


@pytest.fixture(params=FORMS)
def client(request: pytest.FixtureRequest) -> Client:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def texts_input(client: Client, texts: list[str], name: str = "text", binary: bool = True) -> Any:
    module = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    tensor = module.InferInput(name, [len(texts)], "BYTES")
    data = np.array([t.encode() for t in texts], dtype=np.object_)
    if module is httpclient:
        tensor.set_data_from_numpy(data, binary_data=binary)
    else:
        tensor.set_data_from_numpy(data)
    return tensor


def infer(client: Client, model: str, inputs: list[Any], **kwargs: Any) -> Any:
    return (
        client.infer(model, inputs, client_timeout=180, **kwargs)
        if isinstance(client, grpcclient.InferenceServerClient)
        else client.infer(model, inputs, **kwargs)
    )


def status_of(error: InferenceServerException) -> str:
    return str(error.status())


# -- health and metadata -------------------------------------------------------------------------


def test_health_and_server_metadata(client: Client) -> None:
    assert client.is_server_live()
    deadline = time.monotonic() + 120  # a safety net: ready once the zygote has imported the libraries
    while not client.is_server_ready():
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.1)
    meta = client.get_server_metadata()
    if isinstance(client, grpcclient.InferenceServerClient):
        name, extensions = meta.name, list(meta.extensions)
    else:
        name, extensions = meta["name"], meta["extensions"]
    assert name == "modelmora" and "binary_tensor_data" in extensions and "model_repository" in extensions


@pytest.mark.parametrize(
    ("model", "inputs", "outputs"),
    [
        ("minilm", [("text", "BYTES", [-1])], [("embedding", "FP32", [-1, -1])]),
        ("clip", [("image", "BYTES", [-1])], [("embedding", "FP32", [-1, -1])]),
        ("gpt2", [("text", "BYTES", [-1])], [("text", "BYTES", [-1])]),
        ("sd", [("text", "BYTES", [-1])], [("image", "BYTES", [-1])]),
    ],
)
def test_model_metadata_lists_typed_tensors(client: Client, model: str, inputs: list[Any], outputs: list[Any]) -> None:
    meta = client.get_model_metadata(model)
    if isinstance(client, grpcclient.InferenceServerClient):
        got = (
            meta.name,
            list(meta.versions),
            [(t.name, t.datatype, list(t.shape)) for t in meta.inputs],
            [(t.name, t.datatype, list(t.shape)) for t in meta.outputs],
        )
    else:
        got = (
            meta["name"],
            meta["versions"],
            [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]],
            [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]],
        )
    assert got == (model, ["1.0.0"], inputs, outputs)
    assert client.get_model_metadata(model, model_version="1.0.0") is not None


# -- inference -----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["http", "http-json", "grpc"])
def test_embeddings_equal_the_native_api(server: ServerProcess, request: pytest.FixtureRequest, form: str) -> None:
    client = request.getfixturevalue(form.removesuffix("-json"))
    expected = native_embeddings(server, "minilm", {"text": TEXTS})
    result = infer(client, "minilm", [texts_input(client, TEXTS, binary=form != "http-json")], request_id="r7")
    got = result.as_numpy("embedding")
    assert got.dtype == np.float32 and got.shape == (3, 384)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    response = result.get_response()
    if isinstance(response, dict):
        assert (response["model_name"], response["model_version"], response["id"]) == ("minilm", "1.0.0", "r7")
    else:
        assert (response.model_name, response.model_version, response.id) == ("minilm", "1.0.0", "r7")


def test_text_generation_with_task_parameters(server: ServerProcess, client: Client) -> None:
    params = {"max_tokens": 8, "temperature": 0.0}
    result = infer(client, "gpt2", [texts_input(client, ["once upon a time", "the"])], parameters=params)
    texts = [t.decode() for t in result.as_numpy("text")]
    expected = native(server, "gpt2", {"input_data": {"text": ["once upon a time", "the"]}, "parameters": params})
    assert texts == expected["texts"]


def test_images_in_and_out(server: ServerProcess, client: Client) -> None:
    pngs = [png_bytes(40, 30, 1), png_bytes(24, 24, 2)]
    module = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    image = module.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(np.array(pngs, dtype=np.object_))
    got = infer(client, "clip", [image]).as_numpy("embedding")
    expected = native_embeddings(server, "clip", {"image": [base64.b64encode(p).decode() for p in pngs]})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    generated = infer(
        client, "sd", [texts_input(client, ["a red square"])], parameters={"steps": 2, "width": 48, "height": 40}
    )
    (png,) = generated.as_numpy("image")
    with Image.open(io.BytesIO(png)) as picture:
        assert (picture.format, picture.size) == ("PNG", (48, 40))


def test_requested_outputs_json_or_binary(server: ServerProcess, http: httpclient.InferenceServerClient) -> None:
    for binary in (True, False):
        out = httpclient.InferRequestedOutput("embedding", binary_data=binary)
        result = http.infer("minilm", [texts_input(http, ["hi"], binary=False)], outputs=[out])
        assert result.as_numpy("embedding").shape == (1, 384)
        output = result.get_response()["outputs"][0]
        assert ("data" in output) is not binary


@pytest.mark.anyio
async def test_the_asyncio_grpc_client(server: ServerProcess) -> None:
    async with grpcaio.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as client:
        assert await client.is_server_ready() and await client.is_model_ready("minilm") in (True, False)
        tensor = grpcaio.InferInput("text", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([b"hello"], dtype=np.object_))
        result = await client.infer("minilm", [tensor], priority=2, timeout=60_000_000)
        assert result.as_numpy("embedding").shape == (1, 384)


@pytest.mark.anyio
async def test_stream_infer_answers_each_request(server: ServerProcess) -> None:
    responses: list[Any] = []
    done = anyio.Event()
    async with grpcaio.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as client:

        async def requests() -> Any:
            for i, name in enumerate(["text", "text", "wrong"]):
                tensor = grpcaio.InferInput(name, [1], "BYTES")
                tensor.set_data_from_numpy(np.array([f"text {i}".encode()], dtype=np.object_))
                yield {"model_name": "minilm", "inputs": [tensor], "request_id": str(i)}
            await done.wait()

        async for result, error in client.stream_infer(requests()):
            responses.append((result, error))
            if len(responses) == 3:
                done.set()  # the requests end: the call ends
    ok = sorted(r.get_response().id for r, e in responses if e is None)
    errors = [str(e) for r, e in responses if e is not None]
    assert ok == ["0", "1"] and len(errors) == 1 and "takes one input 'text'" in errors[0]


def test_priority_and_timeout(client: Client) -> None:
    assert infer(client, "minilm", [texts_input(client, ["a"])], priority=1, timeout=60_000_000) is not None
    with pytest.raises(InferenceServerException) as late:
        infer(client, "minilm", [texts_input(client, TEXTS * 50)], timeout=1)
    assert status_of(late.value) in ("504", "StatusCode.DEADLINE_EXCEEDED")
    with pytest.raises(InferenceServerException) as bad:
        infer(client, "minilm", [texts_input(client, ["a"])], priority=9)
    assert status_of(bad.value) in ("400", "StatusCode.INVALID_ARGUMENT") and "priority" in bad.value.message()


# -- repository ----------------------------------------------------------------------------------


def test_repository_index_load_and_unload(client: Client) -> None:
    def states() -> dict[str, str]:
        index = client.get_model_repository_index()
        if isinstance(client, grpcclient.InferenceServerClient):
            return {m.name: m.state for m in index.models}
        return {m["name"]: m["state"] for m in index}

    assert sorted(states()) == ["clip", "gpt2", "gpt2-chat", "minilm", "sd"]
    client.load_model("gpt2")
    assert client.is_model_ready("gpt2") and states()["gpt2"] == "READY"
    client.unload_model("gpt2")
    assert not client.is_model_ready("gpt2") and states()["gpt2"] == "UNAVAILABLE"
    with pytest.raises(InferenceServerException) as unknown:
        client.load_model("nope")
    assert status_of(unknown.value) in ("404", "StatusCode.NOT_FOUND")


# -- bad inputs ----------------------------------------------------------------------------------


def fp32_input(client: Client) -> Any:
    module = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    tensor = module.InferInput("text", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 2), dtype=np.float32))
    return tensor


def square_input(client: Client) -> Any:
    module = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    tensor = module.InferInput("text", [2, 2], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"a", b"b"], [b"c", b"d"]], dtype=np.object_))
    return tensor


@pytest.mark.parametrize(
    ("case", "http_status", "grpc_status", "message"),
    [
        ("unknown model", "404", "NOT_FOUND", "model 'nope' is not installed"),
        ("wrong datatype", "400", "INVALID_ARGUMENT", "input 'text' must be BYTES, not FP32"),
        ("wrong shape", "400", "INVALID_ARGUMENT", "must have shape [n] or [n, 1]"),
        ("wrong input name", "400", "INVALID_ARGUMENT", "model 'minilm' (txt2embed) takes one input 'text' (BYTES)"),
        ("txt2img asked for embeddings", "400", "INVALID_ARGUMENT", "has one output 'image'; 'embedding' was asked"),
        ("unknown parameter", "400", "INVALID_ARGUMENT", "parameter 'colour'"),
        ("bad parameter value", "400", "INVALID_ARGUMENT", "parameter 'max_tokens'"),
        ("unknown version", "404", "NOT_FOUND", "model version: model 'minilm' has no version '9.9.9'"),
    ],
)
def test_bad_inputs(client: Client, case: str, http_status: str, grpc_status: str, message: str) -> None:
    module = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    model, inputs, kwargs = "minilm", [texts_input(client, ["a"])], {}
    if case == "unknown model":
        model = "nope"
    elif case == "wrong datatype":
        inputs = [fp32_input(client)]
    elif case == "wrong shape":
        inputs = [square_input(client)]
    elif case == "wrong input name":
        inputs = [texts_input(client, ["a"], name="prompt")]
    elif case == "txt2img asked for embeddings":
        model, kwargs = "sd", {"outputs": [module.InferRequestedOutput("embedding")]}
    elif case == "unknown parameter":
        kwargs = {"parameters": {"colour": "red"}}
    elif case == "bad parameter value":
        model, kwargs = "gpt2", {"parameters": {"max_tokens": 0}}
    elif case == "unknown version":
        kwargs = {"model_version": "9.9.9"}
    with pytest.raises(InferenceServerException) as bad:
        infer(client, model, inputs, **kwargs)
    expected = http_status if module is httpclient else f"StatusCode.{grpc_status}"
    assert status_of(bad.value) == expected, bad.value
    assert message in bad.value.message(), bad.value.message()


HEAD = json.dumps(
    {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 9}}]}
).encode()
"""A JSON header announcing 9 bytes of binary data (one element: a 4-byte length and 5 bytes)."""


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"{", {}, 400, "not valid JSON"),
        (b'{"inputs": []}', {}, 400, "takes one input 'text'"),
        (b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES"}]}', {}, 400, "neither data"),
        (
            b'{"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a"]}]}',
            {},
            400,
            "has 1 elements",
        ),
        (b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [1]}]}', {}, 400, "must be strings"),
        (b"{}", {"Content-Type": "text/plain"}, 415, "is not accepted"),
        (HEAD + b"ab", {"Inference-Header-Content-Length": str(len(HEAD))}, 400, "runs past the body"),
        (HEAD + b"\0" * 12, {"Inference-Header-Content-Length": str(len(HEAD))}, 400, "3 bytes of binary data follow"),
        (b"{}", {"Inference-Header-Content-Length": "99"}, 400, "does not fit the body"),
    ],
)
def test_bad_rest_bodies(
    server: ServerProcess, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    r = httpx.post(f"{server.url}/v2/models/minilm/infer", content=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and message in r.json()["error"], r.text


def test_rest_paths(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/models/nope").status_code == 404
    assert httpx.get(f"{server.url}/v2/models/minilm/versions/9.9.9").status_code == 404
    assert httpx.get(f"{server.url}/v2/nothing").status_code == 404
    wrong = httpx.get(f"{server.url}/v2/models/minilm/infer")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
