"""The registry over REST: listing and paging, metadata, activating a version (new requests go to
it while the old version's requests finish, then its worker stops), deleting; every bad input
gets its status code and a message naming the field. On asyncio and trio."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from modelmora.registry import install

from conftest import AppUnderTest

pytestmark = pytest.mark.anyio


def add_versions(app: AppUnderTest, src: Path, *versions: str, model_id: str = "echo") -> None:
    for v in versions:
        install(app.store, app.home, str(src), model_id=model_id, task="txt2embed", version=v)


async def embed(app: AppUnderTest, text: str = "hi", **extra: Any) -> dict[str, Any]:
    r = await app.client.post("/api/v1/infer/echo", json={"input_data": {"text": text}, **extra})
    assert r.status_code == 200, r.text
    return dict(r.json())


async def state_of(app: AppUnderTest, version: str) -> str:
    models = (await app.client.get("/api/v1/status")).json()["models"]
    return str(next(m["state"] for m in models if m["model_id"] == "echo" and m["version"] == version))


async def test_list_pages_and_filters(echo_app: AppUnderTest, echo_dir: Path) -> None:
    for i in range(24):  # 25 models in all
        task = "img2embed" if i % 3 == 0 else "txt2embed"
        install(echo_app.store, echo_app.home, str(echo_dir), model_id=f"m{i:02d}", task=task)
    add_versions(echo_app, echo_dir, "1.1.0", "2.0.0")  # 3 versions of one
    body = (await echo_app.client.get("/api/v1/models")).json()
    assert body["total"] == 25 and len(body["models"]) == 25
    assert [m["id"] for m in body["models"]] == sorted(m["id"] for m in body["models"])
    echo = next(m for m in body["models"] if m["id"] == "echo")
    assert [v["version"] for v in echo["versions"]] == ["1.0.0", "1.1.0", "2.0.0"]
    assert echo["versions"][0]["checksums"]["weights.bin"] == echo["versions"][2]["checksums"]["weights.bin"]

    page = (await echo_app.client.get("/api/v1/models?limit=10&offset=20")).json()
    assert page["total"] == 25 and [m["id"] for m in page["models"]] == [m["id"] for m in body["models"][20:]]
    images = (await echo_app.client.get("/api/v1/models?task_type=img2embed&limit=3")).json()
    assert images["total"] == 8 and [m["id"] for m in images["models"]] == ["m00", "m03", "m06"]

    for query, field in (("limit=-1", "limit"), ("limit=1001", "limit"), ("offset=x", "offset")):
        r = await echo_app.client.get(f"/api/v1/models?{query}")
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
    r = await echo_app.client.get("/api/v1/models?task_type=txt2vec")
    assert r.status_code == 422 and "txt2vec" in r.json()["error"]["message"]


async def test_metadata_over_rest(echo_app: AppUnderTest) -> None:
    meta = {"display_name": "Echo", "resources": {"memory_mb": 64}, "config": {"vector_size": 4}, "params": {"k": 1}}
    r = await echo_app.client.put("/api/v1/models/echo/metadata", json=meta)
    assert r.status_code == 200, r.text
    got = (await echo_app.client.get("/api/v1/models/echo")).json()
    assert got["metadata"] == meta and got["updated_at"] >= got["created_at"] > 0

    bad = [
        ({"resources": {"memory_mb": 0}}, 422, "$.resources.memory_mb"),
        ({"config": {"max_length": "long"}}, 422, "$.config.max_length"),
        ({"colour": "red"}, 422, "$.colour"),
        ({"params": {"x": "y" * 70_000}}, 422, "$.params"),
    ]
    for body, status, field in bad:
        r = await echo_app.client.put("/api/v1/models/echo/metadata", json=body)
        assert r.status_code == status and r.json()["error"]["field"] == field, r.text
        assert r.json()["error"]["message"].startswith(field.removeprefix("$.") + ":")
    r = await echo_app.client.put(
        "/api/v1/models/echo/metadata", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    r = await echo_app.client.put("/api/v1/models/nope/metadata", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert (await echo_app.client.get("/api/v1/models/echo")).json()["metadata"] == meta  # nothing changed


async def test_activate_and_delete_versions(echo_app: AppUnderTest, echo_dir: Path) -> None:
    add_versions(echo_app, echo_dir, "1.1.0")
    r = await echo_app.client.post("/api/v1/models/echo/versions/1.1.0", json={"pin": True})
    assert r.status_code == 200 and r.json()["active_version"] == "1.1.0" and r.json()["active_pinned"]
    r = await echo_app.client.post("/api/v1/models/echo/versions/1.0.0")  # no body: the pin stays
    assert r.json()["active_version"] == "1.0.0" and r.json()["active_pinned"]

    for path, body, status, field in (
        ("/api/v1/models/echo/versions/9.0.0", None, 404, "version"),
        ("/api/v1/models/nope/versions/1.0.0", None, 404, None),
        ("/api/v1/models/echo/versions/1.1.0", {"pin": "yes"}, 422, "$.pin"),
        ("/api/v1/models/echo/versions/1.1.0", {"pinned": True}, 422, "$"),  # the message names it
    ):
        r = await echo_app.client.post(path, json=body) if body is not None else await echo_app.client.post(path)
        assert r.status_code == status and r.json()["error"].get("field") == field, r.text

    r = await echo_app.client.delete("/api/v1/models/echo/versions/1.0.0")
    assert r.status_code == 409 and "active one" in r.json()["error"]["message"]
    r = await echo_app.client.delete("/api/v1/models/echo/versions/1.1.0")
    assert r.status_code == 200 and [v["version"] for v in r.json()["versions"]] == ["1.0.0"]
    assert not (echo_app.home / "models" / "echo" / "1.1.0").exists()
    r = await echo_app.client.delete("/api/v1/models/echo/versions/1.1.0")
    assert r.status_code == 404
    r = await echo_app.client.delete("/api/v1/models/echo?force=maybe")
    assert r.status_code == 422 and r.json()["error"]["field"] == "force"


@pytest.mark.settings(keep_alive="-1")
async def test_deleting_a_loaded_model(echo_app: AppUnderTest) -> None:
    await embed(echo_app)
    r = await echo_app.client.delete("/api/v1/models/echo")
    assert r.status_code == 409 and r.json()["error"]["code"] == "registry_conflict"
    assert "unload it first" in r.json()["error"]["message"]
    assert (await state_of(echo_app, "1.0.0")) == "ready"  # refused: nothing changed

    r = await echo_app.client.delete("/api/v1/models/echo?force=true")
    assert r.status_code == 200 and r.json()["id"] == "echo"
    assert (await echo_app.client.get("/api/v1/models/echo")).status_code == 404
    assert not (echo_app.home / "models" / "echo").exists()
    assert (await echo_app.client.get("/api/v1/status")).json()["models"] == []
    r = await echo_app.client.post("/api/v1/infer/echo", json={"input_data": {"text": "hi"}})
    assert r.status_code == 404


@pytest.mark.settings(keep_alive="-1")
async def test_switching_the_active_version_under_load(echo_app: AppUnderTest, echo_dir: Path) -> None:
    """Requests keep coming while the active version changes: none fails, those sent after the
    switch reach the new version, the old version's worker finishes its requests and stops."""
    add_versions(echo_app, echo_dir, "2.0.0")
    assert (await embed(echo_app))["version"] == "1.0.0"
    await echo_app.client.post("/api/v1/models/echo/load", params={"version": "2.0.0"})  # warm the new one
    versions: list[str] = []
    some_done, switched = anyio.Event(), anyio.Event()
    after_switch: list[str] = []

    async def client(n: int) -> None:
        for i in range(6):
            after = switched.is_set()
            got = (await embed(echo_app, "__sleep__0.05" if i % 2 else f"t{n}{i}"))["version"]
            versions.append(got)
            if len(versions) >= 6:
                some_done.set()
            if after:
                after_switch.append(got)

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(client, n)
        await some_done.wait()
        r = await echo_app.client.post("/api/v1/models/echo/versions/2.0.0")
        assert r.status_code == 200
        switched.set()
    assert len(versions) == 24  # no request failed (embed asserts 200)
    assert "1.0.0" in versions and after_switch and set(after_switch) == {"2.0.0"}
    for _ in range(1500):  # retired once idle
        if await state_of(echo_app, "1.0.0") == "cached":
            break
        await anyio.sleep(0.02)
    assert await state_of(echo_app, "1.0.0") == "cached"
    assert await state_of(echo_app, "2.0.0") == "ready"
    # the old version can still be asked for by name: it starts again
    assert (await embed(echo_app, version="1.0.0"))["version"] == "1.0.0"
