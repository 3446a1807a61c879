"""Refusals come in the error shape of the protocol whose path was asked for: ours under `/api/v1`,
OpenAI's (`{"error": {"message", "type", "param", "code"}}`) under `/v1/`, the Open Inference
Protocol's (`{"error": "..."}`) under `/v2`. The gate's 401, 403 and 429 (made before any protocol's
code runs) and the routing's 404 and 405 alike, with the same headers in every shape. OIP's
repository load and unload are audited with the caller's token name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
import structlog

from modelmora.api import create_app
from modelmora.security import Gate

from conftest import AppUnderTest

pytestmark = pytest.mark.anyio

INFER_TOKEN = "shape-infer-token-aaaaaaa"
READ_TOKEN = "shape-read-token-bbbbbbbb"
ADMIN_TOKEN = "shape-admin-token-ccccccc"
UNKNOWN = "shape-unknown-token-ddddd"
TOKENS = [f"app infer {INFER_TOKEN}", f"dash read {READ_TOKEN}", f"ops admin,read {ADMIN_TOKEN}"]
AUTH = pytest.mark.settings(auth={"tokens": TOKENS})


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def native(r: httpx.Response, status: int, code: str) -> str:
    """The message of a refusal in our shape."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    message: str = body["error"]["message"]
    return message


def openai(r: httpx.Response, status: int, code: str) -> str:
    """The message of a refusal in OpenAI's shape."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    types = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
    assert body["error"]["type"] == types.get(status, "invalid_request_error")
    assert body["error"]["code"] == code and body["error"]["param"] is None
    message: str = body["error"]["message"]
    return message


def oip(r: httpx.Response, status: int, code: str) -> str:
    """The message of a refusal in the Open Inference Protocol's shape (it has no code)."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    message: str = body["error"]
    return message


Shape = Callable[[httpx.Response, int, str], str]
# (shape, method, a path needing `read`, a path needing `admin`)
PROTOCOLS: list[tuple[Shape, str, str, str]] = [
    (native, "GET", "/api/v1/models", "/api/v1/models/echo/unload"),
    (openai, "GET", "/v1/models", "/v1/models"),
    (oip, "GET", "/v2/models/echo", "/v2/repository/models/echo/unload"),
]


@AUTH
@pytest.mark.parametrize(("shape", "method", "path", "_"), PROTOCOLS, ids=["native", "openai", "oip"])
async def test_no_token_or_a_bad_one_is_401_in_the_protocols_shape(
    echo_app: AppUnderTest, shape: Shape, method: str, path: str, _: str
) -> None:
    client = echo_app.client
    r = await client.request(method, path)
    assert shape(r, 401, "unauthenticated") == "this endpoint needs a token: send 'Authorization: Bearer <token>'"
    assert r.headers["www-authenticate"] == 'Bearer realm="modelmora"'
    r = await client.request(method, path, headers=bearer(UNKNOWN))
    assert shape(r, 401, "unauthenticated") == "the token is not valid"
    assert r.headers["www-authenticate"] == 'Bearer realm="modelmora", error="invalid_token"'
    assert UNKNOWN not in r.text


@AUTH
async def test_a_token_without_the_scope_is_403_in_the_protocols_shape(echo_app: AppUnderTest) -> None:
    client = echo_app.client
    cases: list[tuple[Shape, str, str, str]] = [
        (native, "POST", "/api/v1/models/echo/load", "admin"),
        (openai, "POST", "/v1/embeddings", "infer"),
        (oip, "POST", "/v2/repository/models/echo/load", "admin"),
        (oip, "POST", "/v2/models/echo/infer", "infer"),
    ]
    for shape, method, path, scope in cases:
        r = await client.request(method, path, content=b"{not json", headers=bearer(READ_TOKEN))  # never read
        assert shape(r, 403, "permission_denied") == f"the token 'dash' lacks the {scope!r} scope"
        challenge = f'Bearer realm="modelmora", error="insufficient_scope", scope="{scope}"'
        assert r.headers["www-authenticate"] == challenge


@AUTH
async def test_unknown_paths_and_methods_answer_in_the_protocols_shape(echo_app: AppUnderTest) -> None:
    client, token = echo_app.client, bearer(ADMIN_TOKEN)
    assert native(await client.get("/api/v1/nope", headers=token), 404, "not_found") == "no such endpoint"
    r = await client.get("/api/v1/models/echo/load", headers=token)
    assert native(r, 405, "method_not_allowed") == "method GET is not allowed here"
    assert r.headers["allow"] == "POST"
    assert openai(await client.get("/v1/nope", headers=token), 404, "not_found") == "no such endpoint: GET /v1/nope"
    r = await client.delete("/v1/models", headers=token)
    assert openai(r, 405, "method_not_allowed") == "method DELETE is not allowed here"
    assert r.headers["allow"] == "GET"
    assert oip(await client.get("/v2/nope", headers=token), 404, "not_found") == "no such endpoint: GET /v2/nope"
    r = await client.get("/v2/repository/models/echo/load", headers=token)
    assert oip(r, 405, "method_not_allowed") == "method not allowed here; use POST"
    assert r.headers["allow"] == "POST"


@pytest.mark.settings(auth={"tokens": TOKENS}, max_body_bytes=1000)
async def test_body_refusals_answer_in_the_protocols_shape(echo_app: AppUnderTest) -> None:
    client, token = echo_app.client, bearer(INFER_TOKEN)
    big = b"x" * 1001  # refused from its Content-Length, before it is read
    json_type = {**token, "content-type": "application/json"}
    assert native(await client.post("/api/v1/infer/echo", content=big, headers=json_type), 413, "payload_too_large")
    assert openai(await client.post("/v1/embeddings", content=big, headers=json_type), 413, "payload_too_large")
    assert oip(await client.post("/v2/models/echo/infer", content=big, headers=json_type), 413, "payload_too_large")
    form = {**token, "content-type": "text/plain"}
    r = await client.post("/api/v1/infer/echo", content=b"{}", headers=form)
    native(r, 415, "unsupported_media_type")
    openai(await client.post("/v1/embeddings", content=b"{}", headers=form), 415, "unsupported_media_type")
    oip(await client.post("/v2/models/echo/infer", content=b"{}", headers=form), 415, "unsupported_media_type")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.settings(auth={"tokens": TOKENS, "rate_limit_per_s": 1.0, "rate_limit_burst": 1})
async def test_a_token_over_its_rate_is_429_with_retry_after_in_the_protocols_shape(echo_app: AppUnderTest) -> None:
    clock = Clock()
    asgi = create_app(echo_app.service, Gate(echo_app.settings.auth, clock=clock))
    transport = httpx.ASGITransport(app=asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for shape, method, path, _ in PROTOCOLS:
            assert (await client.request(method, path, headers=bearer(READ_TOKEN))).status_code == 200
            r = await client.request(method, path, headers=bearer(READ_TOKEN))
            message = shape(r, 429, "rate_limited")
            assert message == "this token is over its rate limit of 1 requests/s; retry in 1.00 s"
            assert r.headers["retry-after"] == "1"
            assert (await client.request(method, path, headers=bearer(ADMIN_TOKEN))).status_code == 200  # its own
            clock.now += 1.0  # the next protocol starts with a full bucket


@AUTH
async def test_oip_repository_load_and_unload_are_audited_by_the_tokens_name(echo_app: AppUnderTest) -> None:
    client = echo_app.client
    with structlog.testing.capture_logs() as logs:
        assert (await client.post("/v2/repository/models/echo/load", headers=bearer(ADMIN_TOKEN))).status_code == 200
        assert (await client.post("/v2/repository/models/echo/unload", headers=bearer(ADMIN_TOKEN))).status_code == 200
        r = await client.post("/v2/repository/models/nope/load", headers=bearer(ADMIN_TOKEN))
        assert oip(r, 404, "model_not_found")
    audit: list[Any] = [(e["action"], e["by"], e["model"], e["outcome"]) for e in logs if e["event"] == "audit"]
    assert audit == [
        ("load", "ops", "echo", "ok"),
        ("unload", "ops", "echo", "ok"),
        ("load", "ops", "nope", "model_not_found"),
    ]
    assert ADMIN_TOKEN not in repr(logs)
