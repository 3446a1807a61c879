"""The drop-in protocols in a real `mm serve` (Echo pipeline, JSON logs): each front end's requests
are counted under its own `protocol` label (refusals before the core too), and a caller's
`traceparent` is continued by the request, its log lines and its answer (the response header on
`/v1` and `/v2`, the trailing metadata of OIP's gRPC form)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality
from prometheus_client.parser import text_string_to_metric_families

from modelmora._proto import inference as pb

from conftest import ECHO_LAYOUT, TESTS_DIR
from serverproc import ServerProcess, mm

pytestmark = pytest.mark.slow  # a real server process

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
"""A caller's W3C traceparent (trace 4bf9..., its span 00f0...)."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # grpclib


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("protocol-labels")
    model = root / "echo"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"\0" * 16)
    for file in ECHO_LAYOUT:
        (model / file).write_text("{}")
    home = root / "home"
    mm("install", str(model), "--id", "echo", "--task", "txt2embed", home=home)
    env = {
        "MODELMORA_PIPELINES__TXT2EMBED": "worker_pipelines:Echo",
        "MODELMORA_ZYGOTE": "false",
        "MODELMORA_ZYGOTE_PRELOAD": "numpy",
        "MODELMORA_TORCH_THREADS": "1",
        "MODELMORA_LOG_LEVEL": "debug",  # a request's own line
        "MODELMORA_LOG_FORMAT": "json",
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p),
    }
    srv = ServerProcess(home, env).start()
    try:  # the worker's start is not what these tests are about: it starts first, with time to spare
        warm = {"input_data": {"text": "warm"}, "timeout_seconds": 600}
        assert httpx.post(f"{srv.url}/api/v1/infer/echo", json=warm, timeout=600).status_code == 200
        yield srv
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-5000:]


def scrape(url: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def requests_total(samples: Samples, **labels: str) -> float:
    return samples.get(("modelmora_requests_total", frozenset(labels.items())), 0.0)


def embeddings(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", json={"model": "echo", "input": "a"}, headers=headers, timeout=60)


def oip_rest(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}
    return httpx.post(f"{url}/v2/models/echo/infer", json=body, headers=headers, timeout=60)


async def oip_grpc(port: int, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """One OIP gRPC ModelInfer; its trailing metadata (the call must succeed)."""
    channel = Channel("127.0.0.1", port)
    try:
        req = pb.ModelInferRequest(
            model_name="echo",
            inputs=[
                pb.ModelInferRequestInferInputTensor(
                    name="text", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"a"])
                )
            ],
        )
        async with channel.request(
            "/inference.GRPCInferenceService/ModelInfer",
            Cardinality.UNARY_UNARY,
            pb.ModelInferRequest,
            pb.ModelInferResponse,
            metadata=metadata,
            timeout=60,
        ) as stream:
            await stream.send_message(req, end=True)
            answer = await stream.recv_message()
            assert answer is not None and answer.model_name == "echo"
            await stream.recv_trailing_metadata()
            assert stream.trailing_metadata is not None
            return dict(stream.trailing_metadata)
    finally:
        channel.close()


def _events(server: ServerProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]


def test_each_drop_in_protocol_counts_its_requests_under_its_own_label(server: ServerProcess) -> None:
    url = server.url
    before = scrape(url)
    assert embeddings(url).status_code == 200
    assert oip_rest(url).status_code == 200
    asyncio.run(oip_grpc(server.grpc_port))
    # refused before the core: a malformed body, counted without a model, by the front end's label
    malformed = {"content-type": "application/json"}
    assert httpx.post(f"{url}/v1/embeddings", content=b"{", headers=malformed).status_code == 400
    assert httpx.post(f"{url}/v2/models/echo/infer", content=b"{", headers=malformed).status_code == 400
    after = scrape(url)

    def d(**labels: str) -> float:
        return requests_total(after, **labels) - requests_total(before, **labels)

    for protocol in ("openai", "oip-rest", "oip-grpc"):
        assert d(model="echo", task="txt2embed", protocol=protocol, outcome="ok") == 1, protocol
    assert d(model="", task="", protocol="openai", outcome="malformed_request") == 1
    assert d(model="", task="", protocol="oip-rest", outcome="malformed_request") == 1
    assert not any(name == "modelmora_requests_total" and ("protocol", "unknown") in labels for name, labels in after)


@pytest.mark.parametrize("send", [embeddings, oip_rest], ids=["openai", "oip-rest"])
def test_a_rest_drop_in_continues_the_callers_trace(server: ServerProcess, send: Any) -> None:
    trace_id = CALLER.split("-")[1]
    r = send(server.url, {"traceparent": CALLER})
    assert r.status_code == 200, r.text
    version, returned, span, flags = r.headers["traceparent"].split("-")
    assert (version, returned, flags) == ("00", trace_id, "01")
    assert len(span) == 16 and span != CALLER.split("-")[2] and int(span, 16) != 0
    other = send(server.url).headers["traceparent"].split("-")[1]
    assert other != trace_id and int(other, 16) != 0  # no caller trace: a new one
    # the supervisor's line for the request carries the trace and the front end's label
    done = [e for e in _events(server) if e["event"] == "request_completed" and e.get("trace_id") == trace_id]
    protocol = "openai" if send is embeddings else "oip-rest"
    assert [e["protocol"] for e in done].count(protocol) == 1


def test_every_response_of_a_drop_in_carries_a_traceparent(server: ServerProcess) -> None:
    for path in ("/v1/models", "/v1/no-such-endpoint", "/v2", "/v2/models/nope"):
        r = httpx.get(server.url + path, headers={"traceparent": CALLER})
        assert r.headers["traceparent"].split("-")[1] == CALLER.split("-")[1], path


@pytest.mark.anyio
async def test_oip_grpc_continues_the_callers_trace(server: ServerProcess) -> None:
    trace_id = CALLER.split("-")[1]
    trailers = await oip_grpc(server.grpc_port, {"traceparent": CALLER})
    version, returned, span, flags = trailers["traceparent"].split("-")
    assert (version, returned, flags) == ("00", trace_id, "01") and span != CALLER.split("-")[2]
    done = [e for e in _events(server) if e["event"] == "request_completed" and e.get("trace_id") == trace_id]
    assert [e["protocol"] for e in done].count("oip-grpc") == 1
