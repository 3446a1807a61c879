"""Token authentication on REST, in process on both backends: no token, a wrong one, one without the
scope, the right one; what stays open; the body is never read before the gate; the cross-site POST to
load/unload now needs a token; audit events name the token's name; no token in any log line."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest
import structlog

from modelmora.api import create_app
from modelmora.security import Gate

from conftest import AppUnderTest

pytestmark = pytest.mark.anyio

INFER_TOKEN = "infer-token-aaaaaaaaaaaa"
READ_TOKEN = "read-token-bbbbbbbbbbbbb"
ADMIN_TOKEN = "admin-token-ccccccccccc"
UNKNOWN = "unknown-token-ddddddddddd"
TOKENS = [f"app infer {INFER_TOKEN}", f"dash read {READ_TOKEN}", f"ops admin,read {ADMIN_TOKEN}"]
AUTH = pytest.mark.settings(auth={"tokens": TOKENS}, cors_origins=("https://app.example",))
BODY = b'{"input_data": {"text": "a"}}'


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def json_as(token: str) -> dict[str, str]:
    return {**bearer(token), "content-type": "application/json"}


def assert_error(r: object, status: int, code: str) -> None:
    assert r.status_code == status, r.text  # type: ignore[attr-defined]
    assert r.json()["error"]["code"] == code  # type: ignore[attr-defined]


ENDPOINTS = [
    ("POST", "/api/v1/infer/echo", "infer"),
    ("GET", "/api/v1/models", "read"),
    ("GET", "/api/v1/models/echo", "read"),
    ("PUT", "/api/v1/models/echo", "admin"),
    ("POST", "/api/v1/models/echo/load", "admin"),
    ("POST", "/api/v1/models/echo/unload", "admin"),
    ("GET", "/api/v1/status", "read"),
    ("GET", "/health/models", "read"),
]


@AUTH
async def test_without_a_token_every_protected_endpoint_is_401_before_its_body_is_read(
    echo_app: AppUnderTest,
) -> None:
    for method, path, _ in ENDPOINTS:
        # a malformed body: had it been read, the answer would be 400
        r = await echo_app.client.request(
            method, path, content=b"{not json", headers={"content-type": "application/json"}
        )
        assert_error(r, 401, "unauthenticated")
        assert r.headers["www-authenticate"] == 'Bearer realm="modelmora"'
        assert r.json()["error"]["message"] == "this endpoint needs a token: send 'Authorization: Bearer <token>'"


@AUTH
async def test_a_wrong_token_or_scheme_is_401_and_never_echoed(echo_app: AppUnderTest) -> None:
    r = await echo_app.client.post("/api/v1/infer/echo", content=BODY, headers=json_as(UNKNOWN))
    assert_error(r, 401, "unauthenticated")
    assert r.headers["www-authenticate"] == 'Bearer realm="modelmora", error="invalid_token"'
    assert UNKNOWN not in r.text
    r = await echo_app.client.get("/api/v1/models", headers={"authorization": f"Basic {READ_TOKEN}"})
    assert_error(r, 401, "unauthenticated")
    r = await echo_app.client.get("/api/v1/models", headers={"authorization": f"Bearer {READ_TOKEN}x"})
    assert_error(r, 401, "unauthenticated")


@AUTH
async def test_a_token_without_the_scope_is_403_and_with_it_passes(echo_app: AppUnderTest) -> None:
    tokens = {"infer": INFER_TOKEN, "read": READ_TOKEN, "admin": ADMIN_TOKEN}
    names = {"infer": "app", "read": "dash", "admin": "ops"}
    for method, path, scope in ENDPOINTS:
        for have, token in tokens.items():
            body = BODY if path.startswith("/api/v1/infer") else (b"{}" if method in ("PUT", "POST") else None)
            headers = {**bearer(token), "content-type": "application/json"}
            r = await echo_app.client.request(method, path, content=body, headers=headers)
            allowed = have == scope or (have == "admin" and scope == "read")  # ops holds admin and read
            if allowed:
                assert r.status_code == 200, (method, path, have, r.text)
            else:
                assert_error(r, 403, "permission_denied")
                assert r.json()["error"]["message"] == f"the token {names[have]!r} lacks the {scope!r} scope"
                challenge = f'Bearer realm="modelmora", error="insufficient_scope", scope="{scope}"'
                assert r.headers["www-authenticate"] == challenge


@AUTH
async def test_probes_docs_and_preflights_stay_open(echo_app: AppUnderTest) -> None:
    for path in ("/health/live", "/health/ready", "/docs", "/openapi.json"):
        r = await echo_app.client.get(path)
        assert r.status_code == 200, path
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
    r = await echo_app.client.options("/api/v1/infer/echo", headers=preflight)
    assert r.status_code == 204
    assert "authorization" in r.headers["access-control-allow-headers"]


@AUTH
async def test_unknown_paths_need_a_token_before_they_answer_404(echo_app: AppUnderTest) -> None:
    assert_error(await echo_app.client.get("/api/v1/secret"), 401, "unauthenticated")
    assert_error(await echo_app.client.get("/api/v1/secret", headers=bearer(INFER_TOKEN)), 404, "not_found")
    r = await echo_app.client.patch("/api/v1/models/echo", headers=bearer(ADMIN_TOKEN))
    assert r.status_code == 405  # no such method


@AUTH
async def test_a_cross_site_post_to_load_without_body_or_token_is_refused(echo_app: AppUnderTest) -> None:
    """A page on another site can send a "simple" POST (no body, no Content-Type, no custom header)
    without a preflight: with authentication on it lacks the Authorization header, which a browser
    only sends cross-site after a preflight the server answers for allowed origins alone."""
    for action in ("load", "unload"):
        r = await echo_app.client.post(f"/api/v1/models/echo/{action}", headers={"origin": "https://evil.example"})
        assert_error(r, 401, "unauthenticated")
    status = await echo_app.client.get("/api/v1/status", headers=bearer(READ_TOKEN))
    assert all(m["state"] != "ready" for m in status.json()["models"])  # nothing was loaded


@AUTH
async def test_admin_actions_are_audited_by_name_and_no_token_is_logged(echo_app: AppUnderTest) -> None:
    client = echo_app.client
    with structlog.testing.capture_logs() as logs:
        assert (await client.post("/api/v1/models/echo/load", headers=bearer(ADMIN_TOKEN))).status_code == 200
        assert (await client.post("/api/v1/infer/echo", content=BODY, headers=json_as(INFER_TOKEN))).status_code == 200
        r = await client.put("/api/v1/models/echo", json={"pinned": True}, headers=bearer(ADMIN_TOKEN))
        assert r.status_code == 200
        assert (await client.post("/api/v1/models/echo/unload", headers=bearer(ADMIN_TOKEN))).status_code == 200
        assert (await client.post("/api/v1/models/nope/load", headers=bearer(ADMIN_TOKEN))).status_code == 404
        assert (await client.post("/api/v1/models/echo/load", headers=bearer(READ_TOKEN))).status_code == 403
        assert (await client.post("/api/v1/models/echo/load", headers=bearer(UNKNOWN))).status_code == 401
    audit = [(e["action"], e["by"], e["model"], e["outcome"]) for e in logs if e["event"] == "audit"]
    assert audit == [
        ("load", "ops", "echo", "ok"),
        ("update_settings", "ops", "echo", "ok"),
        ("unload", "ops", "echo", "ok"),
        ("load", "ops", "nope", "model_not_found"),
    ]
    settings_event = next(e for e in logs if e["event"] == "audit" and e["action"] == "update_settings")
    assert settings_event["settings"] == {"pinned": True}
    denied = [e for e in logs if e["event"] == "permission_denied"]
    assert [(e["by"], e["needs"]) for e in denied] == [("dash", "admin")]
    text = repr(logs)
    for token in (INFER_TOKEN, READ_TOKEN, ADMIN_TOKEN, UNKNOWN):
        assert token not in text


@AUTH
async def test_the_drop_in_protocols_need_their_scopes_too(echo_app: AppUnderTest) -> None:
    client, body = echo_app.client, {"model": "echo", "input": "abc", "encoding_format": "float"}
    assert_error(await client.post("/v1/embeddings", json=body), 401, "unauthenticated")
    assert_error(await client.post("/v1/embeddings", json=body, headers=bearer(READ_TOKEN)), 403, "permission_denied")
    r = await client.post("/v1/embeddings", json=body, headers=bearer(INFER_TOKEN))
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 4
    assert (await client.get("/v2/health/live")).status_code == 200  # probes stay open
    r = await client.get("/v2/models/echo")  # in OIP's error shape (tests/api/test_refusal_shapes.py)
    assert r.status_code == 401 and r.json() == {
        "error": "this endpoint needs a token: send 'Authorization: Bearer <token>'"
    }
    r = await client.post("/v2/repository/models/echo/load", headers=bearer(INFER_TOKEN))
    assert r.status_code == 403 and r.json() == {"error": "the token 'app' lacks the 'admin' scope"}


@AUTH
async def test_registry_changes_over_rest_are_audited_by_name(echo_app: AppUnderTest) -> None:
    client = echo_app.client
    with structlog.testing.capture_logs() as logs:
        assert (await client.delete("/api/v1/models/nope", headers=bearer(ADMIN_TOKEN))).status_code == 404
        r = await client.post("/api/v1/models/echo/versions/9.9.9", headers=bearer(ADMIN_TOKEN))
        assert r.status_code == 404
    audit = [(e["action"], e["by"], e["model"]) for e in logs if e["event"] == "audit"]
    assert audit == [("delete", "ops", "nope"), ("activate", "ops", "echo")]
    assert all(e["outcome"] != "ok" for e in logs if e["event"] == "audit")


async def test_with_auth_off_everyone_is_anonymous_and_audited_as_such(echo_app: AppUnderTest) -> None:
    with structlog.testing.capture_logs() as logs:
        r = await echo_app.client.put("/api/v1/models/echo", json={}, headers=bearer(UNKNOWN))  # ignored
        assert r.status_code == 200
    assert [(e["action"], e["by"]) for e in logs if e["event"] == "audit"] == [("update_settings", "anonymous")]


# -- per-token limits ---------------------------------------------------------------------------


class Clock:
    """A hand-driven monotonic clock for the gate's rate limits."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def limited_client(app: AppUnderTest, clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    asgi = create_app(app.service, Gate(app.settings.auth, clock=clock))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://test") as client:
        yield client


@pytest.mark.settings(auth={"tokens": TOKENS, "rate_limit_per_s": 1.0, "rate_limit_burst": 3})
async def test_a_burst_over_the_rate_is_429_and_other_tokens_are_unaffected(echo_app: AppUnderTest) -> None:
    clock = Clock()
    async with limited_client(echo_app, clock) as client:
        for _ in range(3):
            assert (await client.get("/api/v1/models", headers=bearer(READ_TOKEN))).status_code == 200
        r = await client.get("/api/v1/models", headers=bearer(READ_TOKEN))
        assert_error(r, 429, "rate_limited")
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["message"] == "this token is over its rate limit of 1 requests/s; retry in 1.00 s"
        assert (await client.get("/api/v1/models", headers=bearer(ADMIN_TOKEN))).status_code == 200
        assert (await client.get("/health/live")).status_code == 200  # open endpoints are not limited
        clock.now += 1.0
        assert (await client.get("/api/v1/models", headers=bearer(READ_TOKEN))).status_code == 200


@pytest.mark.settings(auth={"tokens": TOKENS, "max_concurrent_requests": 1})
async def test_a_token_over_its_concurrent_requests_is_429_until_one_ends(echo_app: AppUnderTest) -> None:
    gate = Gate(echo_app.settings.auth)
    asgi = create_app(echo_app.service, gate)
    short = {"input_data": {"text": "a"}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://test") as client:
        async with anyio.create_task_group() as tg:
            long = {"input_data": {"text": "__steps__300"}}  # a 30 s job, cancelled below
            tg.start_soon(lambda: client.post("/api/v1/infer/echo", json=long, headers=bearer(INFER_TOKEN)))
            await until_running(echo_app)
            r = await client.post("/api/v1/infer/echo", json=short, headers=bearer(INFER_TOKEN))
            assert_error(r, 429, "too_many_concurrent_requests")
            assert r.headers["retry-after"] == "1"
            assert (await client.get("/api/v1/status", headers=bearer(READ_TOKEN))).status_code == 200
            tg.cancel_scope.cancel()  # the client goes away: its request ends and gives its place back
        assert gate.limits is not None and gate.limits.running("app") == 0
        assert (await client.post("/api/v1/infer/echo", json=short, headers=bearer(INFER_TOKEN))).status_code == 200


async def until_running(app: AppUnderTest) -> None:
    """Return once the echo model runs a batch (a safety net of 60 s, not a performance bound)."""
    with anyio.fail_after(60):
        while True:
            if any(m.busy for m in app.scheduler.status()):
                return
            await anyio.sleep(0.02)
