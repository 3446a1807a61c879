"""The REST protocol's edges (issue 12): bodies that are not UTF-8, nested too deep or with a key
twice; Content-Type; CORS; 405 with Allow; result URLs that ignore the Host header; integral
float priorities; settings errors in words; slow bodies; storage failures as 503; readiness."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from modelmora.ipc import segments
from modelmora.lifecycle import ZygoteLauncher, worker_environment
from modelmora.registry import SQLiteStore, install
from modelmora.results import FilesystemResultStore
from modelmora.scheduler import Scheduler

from conftest import TESTS_DIR, AppUnderTest, make_settings, running_app, worker_env

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}
OK = b'{"input_data": {"text": "a"}}'


async def post(app: AppUnderTest, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    r = await app.client.post("/api/v1/infer/echo", content=body, headers=JSON if headers is None else headers)
    return r.status_code, r.json()


# -- bodies ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80\xed\xb0\x80"],
    ids=["invalid-byte", "overlong-slash", "cesu8-surrogates"],
)
async def test_a_body_that_is_not_utf8_is_400(echo_app: AppUnderTest, text: bytes) -> None:
    status, body = await post(echo_app, b'{"input_data": {"text": "a' + text + b'"}}')
    assert status == 400 and body["error"]["code"] == "malformed_request"
    assert "UTF-8" in body["error"]["message"]


@pytest.mark.parametrize("depth", [65, 500, 100_000])
async def test_json_nested_too_deep_is_400(echo_app: AppUnderTest, depth: int) -> None:
    nested = b"[" * depth + b"]" * depth
    status, body = await post(echo_app, b'{"input_data": {"text": "a"}, "parameters": {"x": ' + nested + b"}}")
    assert status == 400 and body["error"]["code"] == "malformed_request"
    assert "nested deeper than 64 levels" in body["error"]["message"]
    assert (await post(echo_app, OK))[0] == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"input_data": {"text": "a"}, "input_data": {"text": "b"}}', "$.input_data"),
        (b'{"input_data": {"text": "a", "text": "b"}}', "$.input_data.text"),
        (b'{"input_data": {"text": "a"}, "priority": 1, "\\u0070riority": 4}', "$.priority"),
        (b'{"input_data": {"text": ["x", "x"]}, "parameters": {"normalize": true, "normalize": false}}', None),
    ],
)
async def test_a_key_given_twice_is_422_naming_it(echo_app: AppUnderTest, body: bytes, field: str | None) -> None:
    status, got = await post(echo_app, body)
    assert status == 422 and got["error"]["code"] == "invalid_input"
    assert got["error"]["field"] == (field or "$.parameters.normalize")
    assert got["error"]["message"].startswith("duplicate key")


async def test_the_same_key_in_different_objects_is_fine(echo_app: AppUnderTest) -> None:
    status, got = await post(echo_app, b'{"input_data": {"text": ["text", "input_data"]}, "parameters": {}}')
    assert status == 200, got


async def test_an_integral_float_priority_is_an_integer(echo_app: AppUnderTest) -> None:
    assert (await post(echo_app, b'{"input_data": {"text": "a"}, "priority": 3.0}'))[0] == 200
    assert (await post(echo_app, b'{"input_data": {"text": "a"}, "priority": 1}'))[0] == 200
    status, got = await post(echo_app, b'{"input_data": {"text": "a"}, "priority": 2.5}')
    assert status == 422 and got["error"]["field"] == "$.priority" and got["error"]["message"] == "expected an integer"
    doc = (await echo_app.client.get("/openapi.json")).json()
    (number, _names) = doc["components"]["schemas"]["InferRequest"]["properties"]["priority"]["anyOf"]
    assert number == {"type": "integer", "minimum": 1, "maximum": 4}  # JSON Schema's integer takes 3.0


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ({"keep_alive": "forever"}, "expected a duration like '30s', '10m'"),
        ({"device": "gpu"}, "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ],
)
async def test_settings_errors_say_in_words_what_is_expected(
    echo_app: AppUnderTest, setting: dict[str, str], words: str
) -> None:
    r = await echo_app.client.put("/api/v1/models/echo", json=setting)
    assert r.status_code == 422
    message = r.json()["error"]["message"]
    assert message.startswith(words) and "regex" not in message and "^" not in message


@pytest.mark.settings(body_read_timeout_s=0.5)
async def test_a_body_that_does_not_arrive_in_time_is_408(echo_app: AppUnderTest) -> None:
    async def slow() -> AsyncIterator[bytes]:
        yield b'{"input_data": '
        await anyio.sleep(30)  # never comes in time (the request ends before)
        yield b'{"text": "a"}}'

    r = await echo_app.client.post("/api/v1/infer/echo", content=slow(), headers=JSON)
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
    assert "body_read_timeout_s" in r.json()["error"]["message"]


# -- content type ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"},
     {"content-type": "application/json; charset=latin-1"}],
    ids=["missing", "text", "form", "latin1"],
)  # fmt: skip
async def test_a_body_not_declared_json_is_415(echo_app: AppUnderTest, headers: dict[str, str]) -> None:
    status, got = await post(echo_app, OK, headers)
    assert status == 415 and got["error"]["code"] == "unsupported_media_type"
    r = await echo_app.client.put("/api/v1/models/echo", content=b"{}", headers=headers)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    "ctype", ["application/json; charset=utf-8", "application/vnd.example+json", "APPLICATION/JSON"]
)
async def test_json_content_types_are_accepted(echo_app: AppUnderTest, ctype: str) -> None:
    assert (await post(echo_app, OK, {"content-type": ctype}))[0] == 200


async def test_load_and_unload_take_no_body_or_json(echo_app: AppUnderTest) -> None:
    client = echo_app.client
    assert (await client.post("/api/v1/models/echo/load")).status_code == 200  # no body, no content type
    assert (await client.post("/api/v1/models/echo/unload", content=b"{}", headers=JSON)).status_code == 200
    # what a web page of another origin can send without a preflight: refused
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}):
        r = await client.post("/api/v1/models/echo/load", content=b"", headers=headers)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = await client.post("/api/v1/models/echo/load", content=b"x=1")  # a body without a content type
    assert r.status_code == 415
    r = await client.post("/api/v1/models/echo/load", content=b'{"x": 1}', headers=JSON)
    assert r.status_code == 422 and r.json()["error"]["field"] == "$"
    assert echo_app.service.scheduler.status()[0].state != "ready"  # none of those loaded it


# -- CORS and 405 ------------------------------------------------------------------------------


async def test_405_says_which_methods_are_allowed(echo_app: AppUnderTest) -> None:
    r = await echo_app.client.get("/api/v1/infer/echo")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = await echo_app.client.patch("/api/v1/models/echo")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) >= {"GET", "PUT", "DELETE"}
    assert r.json()["error"]["code"] == "method_not_allowed"


async def test_cors_is_off_by_default(echo_app: AppUnderTest) -> None:
    headers = {**JSON, "origin": "https://app.example"}
    r = await echo_app.client.post("/api/v1/infer/echo", content=OK, headers=headers)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = await echo_app.client.options(
        "/api/v1/infer/echo", headers={"origin": "https://app.example", "access-control-request-method": "POST"}
    )
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers and r.headers["allow"] == "POST"


@pytest.mark.settings(cors_origins=("https://app.example", "http://localhost:3000"))
async def test_cors_for_the_configured_origins(echo_app: AppUnderTest) -> None:
    client = echo_app.client
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
    r = await client.options("/api/v1/infer/echo", headers=preflight)
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "content-type" in r.headers["access-control-allow-headers"]
    origin = {"origin": "http://localhost:3000"}
    r = await client.post("/api/v1/infer/echo", content=OK, headers={**JSON, **origin})  # the hot path
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = await client.post("/api/v1/infer/nope", content=OK, headers={**JSON, **origin})  # an error
    assert r.status_code == 404 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = await client.get("/api/v1/models", headers=origin)  # a routed endpoint
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000" and "origin" in r.headers["vary"]
    other = {"origin": "https://evil.example"}
    r = await client.post("/api/v1/infer/echo", content=OK, headers={**JSON, **other})
    assert "access-control-allow-origin" not in r.headers
    r = await client.options("/api/v1/infer/echo", headers={**preflight, **other})
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers


def test_cors_origins_from_the_environment_and_refused_in_words(tmp_path: Path) -> None:
    from modelmora.config import ConfigError, load_settings

    env = {"MODELMORA_CORS_ORIGINS": "https://a.example, http://localhost:3000"}
    assert load_settings(None, environ=env, home=str(tmp_path)).cors_origins == (
        "https://a.example",
        "http://localhost:3000",
    )
    with pytest.raises(ConfigError, match="an origin like"):
        load_settings(None, environ={"MODELMORA_CORS_ORIGINS": "https://a.example/path"}, home=str(tmp_path))


# -- result URLs, storage, readiness -----------------------------------------------------------


@pytest.fixture
async def painter_app(tmp_path: Path, echo_dir: Path) -> AsyncIterator[AppUnderTest]:
    home = tmp_path / "home"
    settings = make_settings(home)
    store = SQLiteStore(home / "registry.sqlite3")
    install(store, home, str(echo_dir), model_id="paint", task="txt2img")
    pipelines = {"txt2img": "worker_pipelines:Painter"}
    scheduler = Scheduler(settings, segments.new_instance_id(), pipelines=pipelines, worker_env=worker_env())
    async with running_app(settings, store, scheduler) as app:
        yield app


async def test_result_urls_ignore_the_host_header(painter_app: AppUnderTest) -> None:
    body = {"input_data": {"text": "a"}, "parameters": {"width": 16, "height": 16}, "return": "url"}
    r = await painter_app.client.post("/api/v1/infer/paint", json=body, headers={"host": "evil.example"})
    assert r.status_code == 200, r.json()
    url = r.json()["output"]["images"][0]["url"]
    assert "evil.example" not in url
    assert url.startswith("http://test/api/v1/results/")  # the address the connection reached
    assert (await painter_app.client.get(url)).status_code == 200


async def test_a_result_store_that_cannot_be_written_is_503(painter_app: AppUnderTest) -> None:
    results = painter_app.service.results
    assert isinstance(results, FilesystemResultStore)
    # permissions do not stop root: a file where the directory was makes every write fail
    shutil.rmtree(results.directory)
    results.directory.write_bytes(b"")
    body = {"input_data": {"text": "a"}, "parameters": {"width": 16, "height": 16}, "return": "url"}
    r = await painter_app.client.post("/api/v1/infer/paint", json=body)
    assert r.status_code == 503 and r.json()["error"]["code"] == "result_store_unavailable"
    assert "retry-after" in r.headers
    body["return"] = "inline"  # the server and the model keep serving
    assert (await painter_app.client.post("/api/v1/infer/paint", json=body)).status_code == 200


def _read_only(store: SQLiteStore) -> None:
    """The registry as a read-only database file appears to SQLite (permissions do not stop root)."""
    with store._lock:
        store._db.execute("PRAGMA query_only = ON")


async def test_a_registry_that_cannot_be_written_is_503_and_not_ready(echo_app: AppUnderTest) -> None:
    assert (await echo_app.client.get("/health/ready")).status_code == 200
    _read_only(echo_app.store)
    r = await echo_app.client.put("/api/v1/models/echo", json={"keep_alive": "1m"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable"
    r = await echo_app.client.get("/health/ready")
    assert r.status_code == 503 and r.json()["reason"] == "registry unreachable"
    assert (await post(echo_app, OK))[0] == 200  # reading still works: requests are served


def test_the_registry_ping_probes_a_write(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "r.sqlite3")
    try:
        store.ping()
        _read_only(store)
        with pytest.raises(Exception, match="readonly"):
            store.ping()
    finally:
        store.close()


@pytest.fixture
async def slow_zygote_app(tmp_path: Path, echo_dir: Path) -> AsyncIterator[AppUnderTest]:
    home = tmp_path / "home"
    settings = make_settings(home)
    store = SQLiteStore(home / "registry.sqlite3")
    install(store, home, str(echo_dir), model_id="echo", task="txt2embed")
    env = worker_env()
    env["PYTHONPATH"] = os.pathsep.join((str(TESTS_DIR / "lifecycle"), env["PYTHONPATH"]))
    launcher = ZygoteLauncher(
        env=worker_environment(env, 1), preload=("zygote_slow_import",), ready_timeout_s=60, stop_grace_s=0.2
    )
    scheduler = Scheduler(
        settings, segments.new_instance_id(), pipelines={"txt2embed": "worker_pipelines:Echo"}, launcher=launcher
    )
    async with launcher.running(), running_app(settings, store, scheduler) as app:
        yield app


async def test_not_ready_while_the_zygote_imports(slow_zygote_app: AppUnderTest) -> None:
    launcher = slow_zygote_app.scheduler.launcher
    assert isinstance(launcher, ZygoteLauncher) and launcher.state == "starting"
    r = await slow_zygote_app.client.get("/health/ready")
    assert r.status_code == 503 and "zygote" in r.json()["reason"]
    assert (await slow_zygote_app.client.get("/health/live")).status_code == 200
