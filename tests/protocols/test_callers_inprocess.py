"""The drop-in REST front ends in process (Echo pipeline, tokens configured): the core's call of each
request carries the front end's protocol, the request's trace context and the caller the gate
admitted, as the native API's does."""

from __future__ import annotations

from typing import Any

import pytest

from modelmora.service import InferCall, InferResult

from conftest import BOTH_BACKENDS, AppUnderTest

pytestmark = [pytest.mark.anyio, BOTH_BACKENDS]

TOKEN = "infer-token-aaaaaaaaaaaa"
CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
OIP_BODY = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}


@pytest.mark.settings(auth={"tokens": [f"app infer {TOKEN}"]})
@pytest.mark.parametrize(
    ("path", "body", "protocol"),
    [
        ("/v1/embeddings", {"model": "echo", "input": "a"}, "openai"),
        ("/v2/models/echo/infer", OIP_BODY, "oip-rest"),
        ("/api/v1/infer/echo", {"input_data": {"text": "a"}}, "rest"),  # what the others match
    ],
)
async def test_the_core_call_carries_protocol_trace_and_caller(
    echo_app: AppUnderTest, monkeypatch: pytest.MonkeyPatch, path: str, body: dict[str, Any], protocol: str
) -> None:
    seen: list[InferCall] = []
    infer = echo_app.service.infer

    async def spy(call: InferCall, **kwargs: Any) -> InferResult:
        seen.append(call)
        return await infer(call, **kwargs)

    monkeypatch.setattr(echo_app.service, "infer", spy)
    headers = {"authorization": f"Bearer {TOKEN}", "traceparent": CALLER}
    r = await echo_app.client.post(path, json=body, headers=headers)
    assert r.status_code == 200, r.text
    (call,) = seen
    assert call.protocol == protocol
    assert call.identity.name == "app"
    assert call.trace is not None and call.trace.trace_id == CALLER.split("-")[1]
    assert r.headers["traceparent"] == call.trace.traceparent
