"""Every RPC against `mm serve` with the real all-MiniLM-L6-v2, through grpclib's client over our
generated stubs: embeddings as REST's, the registry, load/unload/status, health, reflection, bad
inputs, and InferStream (1,000 requests; cancelled midway)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.reflection.v1.reflection_grpc import ServerReflectionStub
from grpclib.reflection.v1.reflection_pb2 import ServerReflectionRequest

from modelmora._proto.modelmora import v1
from modelmora.ipc import segments

from grpc_api.conftest import eventually, model_status, settled
from serverproc import ServerProcess, mm

pytestmark = [pytest.mark.slow, pytest.mark.anyio]  # a real server process and model

MODEL = "minilm"
MAX_MESSAGE = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("grpc-home")
    mm("install", str(minilm_path), "--id", MODEL, "--task", "txt2embed", home=home)
    mm("install", str(minilm_path), "--id", "spare", "--task", "txt2embed", home=home)
    env = {"MODELMORA_TORCH_THREADS": "2", "MODELMORA_GRPC_MAX_MESSAGE_BYTES": str(MAX_MESSAGE)}
    srv = ServerProcess(home, env).start()
    try:
        yield srv
    finally:
        assert srv.stop() == 0
        assert [n for n in segments.our_segments() if n.startswith(f"mm-{srv.pid}-")] == []


def rows(e: v1.Embeddings) -> np.ndarray:
    return np.frombuffer(e.data, "<f4").reshape(tuple(e.shape))


async def test_infer_embeddings_equal_rest(server: ServerProcess, channel: Channel) -> None:
    texts = ["hello world", "a gRPC front end over the same core", "bonjour"]
    res = await v1.InferenceServiceStub(channel).infer(
        v1.InferRequest(request_id="r1", model_id=MODEL, texts=texts, embedding=v1.EmbeddingParameters(normalize=True)),
        timeout=120,
    )
    assert (res.request_id, res.model_id, res.version, res.task_type) == ("r1", MODEL, "1.0.0", v1.TaskType.TXT2EMBED)
    got = rows(res.embeddings)
    assert got.shape == (3, 384)
    body = {"input_data": {"text": texts}, "parameters": {"normalize": True}}
    async with httpx.AsyncClient(timeout=120) as client:
        r = await client.post(f"{server.url}/api/v1/infer/{MODEL}", json=body)
    rest = np.array(r.json()["output"]["embeddings"])
    cosine = (got * rest).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(rest, axis=1))
    assert (cosine >= 0.9999).all(), cosine
    assert res.timing.total_ms >= res.timing.inference_ms > 0


async def test_registry_list_get_update_delete(channel: Channel) -> None:
    registry = v1.RegistryServiceStub(channel)
    listed = await registry.list_models(v1.ListModelsRequest(task_type=v1.TaskType.TXT2EMBED))
    assert sorted(m.id for m in listed.models) == [MODEL, "spare"]
    assert (await registry.list_models(v1.ListModelsRequest(task_type=v1.TaskType.TXT2IMG))).models == []
    with pytest.raises(GRPCError) as unknown:
        await registry.list_models(v1.ListModelsRequest(task_type=9))  # type: ignore[arg-type]
    assert (unknown.value.status, unknown.value.message) == (Status.INVALID_ARGUMENT, "task_type: unknown task type 9")
    model = await registry.get_model(v1.GetModelRequest(model_id=MODEL))
    assert (model.task_type, model.active_version, model.versions[0].version) == (
        v1.TaskType.TXT2EMBED,
        "1.0.0",
        "1.0.0",
    )
    assert model.versions[0].files > 0 and model.versions[0].size_bytes > 0
    updated = await registry.update_model_settings(
        v1.UpdateModelSettingsRequest(model_id="spare", settings=v1.ModelSettings(max_batch_size=8, keep_alive="5m"))
    )
    assert (updated.settings.max_batch_size, updated.settings.keep_alive, updated.settings.pinned) == (8, "5m", None)
    with pytest.raises(GRPCError) as bad:
        await registry.update_model_settings(
            v1.UpdateModelSettingsRequest(model_id="spare", settings=v1.ModelSettings(keep_alive="soon"))
        )
    assert bad.value.status == Status.INVALID_ARGUMENT and bad.value.message.startswith("settings.keep_alive: ")
    deleted = await registry.delete_model(v1.DeleteModelRequest(model_id="spare"))
    assert (deleted.model_id, deleted.versions) == ("spare", ["1.0.0"])
    for call in (
        registry.get_model(v1.GetModelRequest(model_id="spare")),
        registry.delete_model(v1.DeleteModelRequest(model_id="spare")),
    ):
        with pytest.raises(GRPCError) as gone:
            await call
        assert gone.value.status == Status.NOT_FOUND and "'spare'" in gone.value.message


async def test_load_unload_status(channel: Channel) -> None:
    management = v1.ManagementServiceStub(channel)
    loaded = await management.load_model(v1.LoadModelRequest(model_id=MODEL), timeout=120)
    assert (loaded.model_id, loaded.state, loaded.task_type) == (MODEL, "ready", "txt2embed")
    assert loaded.worker is not None and loaded.worker.pid > 0 and loaded.worker.start_ms
    status = await management.get_status(v1.GetStatusRequest())
    assert status.supervisor.pid > 0 and not status.supervisor.torch_imported
    assert status.zygote is not None and status.zygote.state and status.images.capacity_pixels > 0
    assert any(m.model_id == MODEL and m.state == "ready" for m in status.models)
    unloaded = await management.unload_model(v1.UnloadModelRequest(model_id=MODEL), timeout=120)
    assert unloaded.state == "cached" and unloaded.worker is None
    with pytest.raises(GRPCError) as bad:
        await management.load_model(v1.LoadModelRequest(model_id=MODEL, version="9.9.9"))
    assert bad.value.status == Status.NOT_FOUND and bad.value.message.startswith("version: ")


async def test_health_check_and_watch(channel: Channel) -> None:
    health = HealthStub(channel)
    for name in ("", "modelmora.v1.InferenceService", "grpc.health.v1.Health", f"model/{MODEL}"):
        assert (await health.Check(HealthCheckRequest(service=name))).status == HealthCheckResponse.SERVING, name
    for name in ("model/nope", "no.such.Service"):
        with pytest.raises(GRPCError) as unknown:
            await health.Check(HealthCheckRequest(service=name))
        assert unknown.value.status == Status.NOT_FOUND
    async with health.Watch.open() as stream:
        await stream.send_message(HealthCheckRequest(service=f"model/{MODEL}"), end=True)
        assert (await stream.recv_message()).status == HealthCheckResponse.SERVING  # type: ignore[union-attr]
        await stream.cancel()


async def test_reflection_lists_and_describes_the_services(channel: Channel) -> None:
    async with ServerReflectionStub(channel).ServerReflectionInfo.open() as stream:
        await stream.send_message(ServerReflectionRequest(list_services=""))
        listed = await stream.recv_message()
        assert listed is not None
        names = {s.name for s in listed.list_services_response.service}
        assert {
            "modelmora.v1.InferenceService",
            "modelmora.v1.RegistryService",
            "modelmora.v1.ManagementService",
        } <= names
        assert "grpc.health.v1.Health" in names
        await stream.send_message(ServerReflectionRequest(file_containing_symbol="modelmora.v1.InferenceService"))
        found = await stream.recv_message()
        assert found is not None and len(found.file_descriptor_response.file_descriptor_proto) == 1
        await stream.send_message(ServerReflectionRequest(file_by_filename="modelmora/v1/types.proto"), end=True)
        types = await stream.recv_message()
        assert types is not None and types.file_descriptor_response.file_descriptor_proto


@pytest.mark.parametrize(
    ("request_", "status", "message"),
    [
        (v1.InferRequest(model_id="nope", texts=["x"]), Status.NOT_FOUND, "model 'nope' is not installed"),
        (
            v1.InferRequest(model_id=MODEL, version="2.0.0", texts=["x"]),
            Status.NOT_FOUND,
            "version: model 'minilm' has no version '2.0.0'",
        ),
        (
            v1.InferRequest(model_id=MODEL, images=[v1.Image(encoded=b"png?")]),
            Status.INVALID_ARGUMENT,
            "images: txt2embed takes texts, not images",
        ),
        (
            v1.InferRequest(model_id=MODEL, texts=["x"], images=[v1.Image(url="http://x")]),
            Status.INVALID_ARGUMENT,
            "images: give texts or images, not both",
        ),
        (v1.InferRequest(model_id=MODEL), Status.INVALID_ARGUMENT, "texts: at least one text is needed"),
        (
            v1.InferRequest(model_id=MODEL, texts=["x"], generation=v1.GenerationParameters(max_tokens=5)),
            Status.INVALID_ARGUMENT,
            "generation: txt2embed takes EmbeddingParameters, not GenerationParameters",
        ),
        (
            v1.InferRequest(model_id=MODEL, texts=["ok", "x" * 100_001]),
            Status.INVALID_ARGUMENT,
            "texts[1]: text of 100001 characters exceeds the limit",
        ),
        (
            v1.InferRequest(model_id=MODEL, texts=["x"], timeout_seconds=-1),
            Status.INVALID_ARGUMENT,
            "timeout_seconds: timeout_seconds must be > 0",
        ),
        (
            v1.InferRequest(model_id=MODEL, texts=["x"], priority=9),
            Status.INVALID_ARGUMENT,
            "priority: unknown priority 9",
        ),
        (
            v1.InferRequest(model_id=MODEL, texts=["y" * (MAX_MESSAGE + 1)]),
            Status.RESOURCE_EXHAUSTED,
            f"exceeds the limit of {MAX_MESSAGE} bytes (grpc_max_message_bytes)",
        ),
        (
            v1.InferRequest(model_id=MODEL, texts=["x"] * 64, timeout_seconds=0.000_001),
            Status.DEADLINE_EXCEEDED,
            "did not answer within",
        ),
    ],
)
async def test_bad_inputs(channel: Channel, request_: v1.InferRequest, status: Status, message: str) -> None:
    with pytest.raises(GRPCError) as err:
        await v1.InferenceServiceStub(channel).infer(request_, timeout=120)
    assert err.value.status == status
    assert message in (err.value.message or ""), err.value.message
    assert "Traceback" not in (err.value.message or "")


async def test_generate_refuses_a_task_that_does_not_stream(channel: Channel) -> None:
    with pytest.raises(GRPCError) as err:
        async for _ in v1.InferenceServiceStub(channel).generate(v1.InferRequest(model_id=MODEL, texts=["x"])):
            pass
    assert err.value.status == Status.INVALID_ARGUMENT and "does not stream" in (err.value.message or "")


async def test_error_metadata_names_code_and_field(channel: Channel) -> None:
    async with v1.InferenceServiceStub(channel).channel.request(
        "/modelmora.v1.InferenceService/Infer",
        Cardinality.UNARY_UNARY,
        v1.InferRequest,
        v1.InferResponse,
    ) as stream:
        await stream.send_message(v1.InferRequest(model_id=MODEL, texts=["ok", "", "x" * 100_001]), end=True)
        with pytest.raises(GRPCError):
            await stream.recv_message()
        assert stream.trailing_metadata is not None
        trailers = dict(stream.trailing_metadata)
    assert trailers["modelmora-error-code"] == "invalid_input" and trailers["modelmora-error-field"] == "texts[2]"


CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
"""A caller's W3C traceparent (trace 4bf9..., its span 00f0...)."""


def trace_of(traceparent: str) -> tuple[str, str, str, str]:
    version, trace_id, span_id, flags = traceparent.split("-")
    assert len(trace_id) == 32 and len(span_id) == 16 and int(trace_id, 16) and int(span_id, 16)
    return version, trace_id, span_id, flags


async def call_trailers(
    channel: Channel, method: str, messages: list[Any], reply: type[Any], metadata: dict[str, str] | None = None
) -> tuple[list[Any], dict[str, Any], GRPCError | None]:
    """Call `method` with `messages` through grpclib's stream API: the answers, the trailing
    metadata, and the call's error (None: OK)."""
    cardinality = Cardinality.STREAM_STREAM if method == "InferStream" else Cardinality.UNARY_UNARY
    answers: list[Any] = []
    error = None
    async with channel.request(
        f"/modelmora.v1.InferenceService/{method}", cardinality, v1.InferRequest, reply, metadata=metadata, timeout=120
    ) as stream:
        for message in messages:
            await stream.send_message(message)
        await stream.end()
        try:
            async for answer in stream:
                answers.append(answer)
            if stream.trailing_metadata is None:  # a unary answer: the trailers follow its message
                await stream.recv_trailing_metadata()
        except GRPCError as exc:
            error = exc
        assert stream.trailing_metadata is not None
        return answers, dict(stream.trailing_metadata), error


async def test_trailing_metadata_returns_the_trace(channel: Channel) -> None:
    ok = v1.InferRequest(model_id=MODEL, texts=["traced"])
    answers, trailers, error = await call_trailers(channel, "Infer", [ok], v1.InferResponse, {"traceparent": CALLER})
    assert error is None and len(answers) == 1
    version, trace_id, span_id, flags = trace_of(trailers["traceparent"])
    assert (version, trace_id, flags) == ("00", CALLER.split("-")[1], "01")
    assert span_id != CALLER.split("-")[2]  # the server's own span in the caller's trace
    _, trailers, _ = await call_trailers(channel, "Infer", [ok], v1.InferResponse)
    assert trace_of(trailers["traceparent"])[1] != trace_id  # no caller trace: a new one
    _, trailers, error = await call_trailers(
        channel, "Infer", [v1.InferRequest(model_id="nope", texts=["x"])], v1.InferResponse, {"traceparent": CALLER}
    )
    assert error is not None and error.status == Status.NOT_FOUND
    assert trace_of(trailers["traceparent"])[1] == trace_id and trailers["modelmora-error-code"] == "model_not_found"
    requests = [v1.InferRequest(request_id=str(i), model_id=MODEL, texts=[f"t{i}"]) for i in range(3)]
    answers, trailers, error = await call_trailers(
        channel, "InferStream", requests, v1.InferStreamResponse, {"traceparent": CALLER}
    )
    assert error is None and sorted(a.request_id for a in answers) == ["0", "1", "2"]
    assert trace_of(trailers["traceparent"])[1] == trace_id


async def test_infer_stream_answers_each_of_1000_requests_once(channel: Channel) -> None:
    rng = random.Random(7)
    priorities = [
        rng.choice(
            [v1.Priority.CRITICAL, v1.Priority.HIGH, v1.Priority.NORMAL, v1.Priority.LOW, v1.Priority.UNSPECIFIED]
        )
        for _ in range(1000)
    ]
    requests = [
        v1.InferRequest(
            request_id=f"id-{i}", model_id=MODEL, texts=[f"sentence number {i}"], priority=p, timeout_seconds=120
        )
        for i, p in enumerate(priorities)
    ]
    requests.insert(500, v1.InferRequest(request_id="bad", model_id="nope", texts=["x"]))
    answers = [a async for a in v1.InferenceServiceStub(channel).infer_stream(requests, timeout=300)]
    ids = [a.request_id for a in answers]
    assert len(ids) == len(set(ids)) == 1001
    by_id = {a.request_id: a for a in answers}
    assert by_id["bad"].error is not None and by_id["bad"].error.status == Status.NOT_FOUND.value
    assert by_id["bad"].error.code == "model_not_found"
    for i in range(1000):
        response = by_id[f"id-{i}"].response
        assert response is not None and response.request_id == f"id-{i}" and response.embeddings.shape == [1, 384]


async def test_infer_stream_refuses_a_duplicate_id_in_flight(channel: Channel) -> None:
    stub = v1.InferenceServiceStub(channel)
    texts = ["t" * 2000] * 64  # long enough to be in flight when its twin arrives
    reqs = [
        v1.InferRequest(request_id="same", model_id=MODEL, texts=texts),
        v1.InferRequest(request_id="same", model_id=MODEL, texts=["x"]),
        v1.InferRequest(model_id=MODEL, texts=["x"]),
    ]
    answers = [a async for a in stub.infer_stream(reqs, timeout=120)]
    errors = sorted((a.request_id, a.error.field) for a in answers if a.error is not None)
    assert errors == [("", "request_id"), ("same", "request_id")]
    assert sum(a.response is not None for a in answers) == 1


async def test_cancelled_stream_leaves_no_queued_work(channel: Channel) -> None:
    await v1.ManagementServiceStub(channel).load_model(v1.LoadModelRequest(model_id=MODEL), timeout=120)
    before = await model_status(channel, MODEL)
    stub = v1.InferenceServiceStub(channel)
    async with stub.channel.request(
        "/modelmora.v1.InferenceService/InferStream",
        Cardinality.STREAM_STREAM,
        v1.InferRequest,
        v1.InferStreamResponse,
        timeout=300,
    ) as stream:
        for i in range(400):
            await stream.send_message(v1.InferRequest(request_id=str(i), model_id=MODEL, texts=["w " * 200] * 4))
        first = await stream.recv_message()
        assert first is not None and first.response is not None
        queued = await eventually(lambda: model_status(channel, MODEL), lambda m: m.queue_depth > 0)
        assert queued.queue_depth > 0
        await stream.cancel()
    after = await eventually(lambda: model_status(channel, MODEL), settled)
    assert after.cancelled > before.cancelled
    assert after.served - before.served < 400  # the withdrawn requests never ran


HEALTH_PROTO = """
syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health {
  rpc Check(HealthCheckRequest) returns (HealthCheckResponse);
  rpc Watch(HealthCheckRequest) returns (stream HealthCheckResponse);
}
"""

GRPCIO_CLIENT = """
import json, sys
import grpc
from modelmora.v1 import inference_pb2 as pb, inference_pb2_grpc as rpc
import health_pb2, health_pb2_grpc

out = {}
with grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}") as channel:
    stub = rpc.InferenceServiceStub(channel)
    r, call = stub.Infer.with_call(pb.InferRequest(request_id="g", model_id="minilm", texts=["hello world"],
                                   embedding=pb.EmbeddingParameters(normalize=True)), timeout=120,
                                   metadata=[("traceparent", sys.argv[2])])
    out["infer"] = [r.request_id, list(r.embeddings.shape), r.embeddings.data.hex()]
    out["trailers"] = dict(call.trailing_metadata())
    try:
        stub.Infer(pb.InferRequest(model_id="nope", texts=["x"]), timeout=30)
    except grpc.RpcError as e:
        out["not_found"] = [e.code().name, e.details(), dict(e.trailing_metadata())]
    try:
        stub.Infer(pb.InferRequest(model_id="minilm", texts=["x " * 200] * 512), timeout=0.05)
    except grpc.RpcError as e:
        out["deadline"] = e.code().name
    health = health_pb2_grpc.HealthStub(channel)
    out["health"] = [health.Check(health_pb2.HealthCheckRequest(service=s), timeout=30).status
                     for s in ("", "model/minilm")]
print(json.dumps(out))
"""


@pytest.fixture
def grpcio_client(tmp_path: Path) -> Path:
    """A grpcio client script beside stubs generated by grpcio-tools from our .proto files (and the
    standard health.proto)."""
    schema = Path(__file__).resolve().parents[2] / "schema"
    (tmp_path / "health.proto").write_text(HEALTH_PROTO)
    protos = [str(p.relative_to(schema)) for p in sorted((schema / "modelmora" / "v1").glob("*.proto"))]
    protoc = [sys.executable, "-m", "grpc_tools.protoc", f"-I{schema}", f"-I{tmp_path}"]
    out = [f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}"]
    subprocess.run([*protoc, *out, *protos, "health.proto"], check=True)
    for package in ("modelmora", "modelmora/v1"):
        (tmp_path / package / "__init__.py").touch()  # a regular package: it shadows ours in that process
    (tmp_path / "client.py").write_text(GRPCIO_CLIENT)
    return tmp_path / "client.py"


async def test_a_grpcio_client_from_the_same_proto_files(
    server: ServerProcess, channel: Channel, grpcio_client: Path
) -> None:
    """Wire compatibility: stubs generated by grpcio-tools, driven by grpcio, in a process of their own
    (their `modelmora` package and grpcio's health module would clash with ours in this one)."""
    proc = await anyio.run_process(
        [sys.executable, str(grpcio_client), str(server.grpc_port), CALLER], cwd=grpcio_client.parent
    )
    out = json.loads(proc.stdout)
    request_id, shape, data = out["infer"]
    assert (request_id, shape) == ("g", [1, 384])
    ours = await v1.InferenceServiceStub(channel).infer(
        v1.InferRequest(model_id=MODEL, texts=["hello world"], embedding=v1.EmbeddingParameters(normalize=True))
    )
    theirs = np.frombuffer(bytes.fromhex(data), "<f4")
    assert float(theirs @ rows(ours.embeddings)[0]) >= 0.9999
    code, details, trailers = out["not_found"]
    assert (code, details) == ("NOT_FOUND", "model 'nope' is not installed")
    assert trailers["modelmora-error-code"] == "model_not_found" and trace_of(trailers["traceparent"])
    _, trace_id, span_id, _ = trace_of(out["trailers"]["traceparent"])
    assert trace_id == CALLER.split("-")[1] and span_id != CALLER.split("-")[2]
    assert out["deadline"] == "DEADLINE_EXCEEDED"
    assert out["health"] == [1, 1]  # SERVING
