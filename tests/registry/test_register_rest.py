"""Registering over REST: `POST /api/v1/models` checks the request at once (422 naming the field,
409 for a version already there), installs in the background, and the operation is polled;
`POST /api/v1/models/{id}/download` fetches a version's files again at its pinned revision. On
asyncio and trio."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from httpfiles import Files, files, model_files, targz

from modelmora.registry import DownloadCache

from conftest import AppUnderTest

__all__ = ("files",)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def served(echo_app: AppUnderTest) -> AsyncIterator[AppUnderTest]:
    """echo_app with the core's background tasks running (registry sync, operations)."""
    async with anyio.create_task_group() as tg:
        await tg.start(echo_app.service.run)
        yield echo_app
        tg.cancel_scope.cancel()


async def finished(app: AppUnderTest, location: str) -> dict[str, Any]:
    for _ in range(3000):
        op = (await app.client.get(location)).json()
        if op["status"] in ("succeeded", "failed"):
            return dict(op)
        await anyio.sleep(0.01)
    raise AssertionError(f"the operation did not finish: {op}")


@pytest.mark.settings(allow_private_urls=True)
async def test_register_from_a_url_in_the_background(
    served: AppUnderTest, files: Files, tmp_path: Path, echo_dir: Path
) -> None:
    archive = targz(model_files(echo_dir), top="tiny/")
    files.files["/tiny.tar.gz"] = archive
    body = {
        "source": files.url("/tiny.tar.gz"),
        "task_type": "txt2embed",
        "version": "2.0.0",
        "metadata": {"display_name": "Tiny", "resources": {"memory_mb": 100}},
        "settings": {"max_batch_size": 4},
    }
    r = await served.client.post("/api/v1/models", json=body)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/api/v1/operations/{r.json()['id']}"
    assert r.json()["model_id"] == "tiny" and r.json()["kind"] == "install"
    op = await finished(served, r.headers["location"])
    assert op["status"] == "succeeded" and op["done_bytes"] == op["total_bytes"] == len(archive), op
    model = (await served.client.get("/api/v1/models/tiny")).json()
    assert model["active_version"] == "2.0.0" and model["metadata"]["display_name"] == "Tiny"
    assert model["versions"][0]["revision"] == hashlib.sha256(archive).hexdigest()
    assert model["settings"] == {"max_batch_size": 4}
    r = await served.client.post("/api/v1/infer/tiny", json={"input_data": {"text": "hi"}})
    assert r.status_code == 200 and r.json()["version"] == "2.0.0"  # served at once

    r = await served.client.post("/api/v1/models", json=body)  # the same version again
    assert r.status_code == 409 and "already installed" in r.json()["error"]["message"]

    files.files.pop("/tiny.tar.gz")  # a source gone: the operation fails with the error's code
    r = await served.client.post("/api/v1/models", json={**body, "version": "3.0.0"})
    op = await finished(served, r.headers["location"])
    assert op["status"] == "failed" and op["error"]["code"] == "model_not_found", op
    assert "HTTP 404" in op["error"]["message"]

    # the files of a version lost or changed: fetched again at the pinned revision
    files.files["/tiny.tar.gz"] = archive
    weights = served.home / "models" / "tiny" / "2.0.0" / "weights.bin"
    weights.write_bytes(b"changed")
    r = await served.client.post("/api/v1/models/tiny/download", json={"version": "2.0.0"})
    assert r.status_code == 202
    op = await finished(served, r.headers["location"])
    assert op["status"] == "succeeded", op
    assert weights.read_bytes() == (echo_dir / "weights.bin").read_bytes()
    files.files["/tiny.tar.gz"] = targz({**model_files(echo_dir), "extra.json": b"{}"})  # the URL changed
    r = await served.client.post("/api/v1/models/tiny/download")
    op = await finished(served, r.headers["location"])
    assert op["status"] == "succeeded", op  # the pinned content is still in the download cache
    DownloadCache.under(served.home).prune(set())
    r = await served.client.post("/api/v1/models/tiny/download")
    op = await finished(served, r.headers["location"])
    assert op["status"] == "failed" and op["error"]["code"] == "checksum_mismatch", op


@pytest.mark.parametrize(
    ("body", "status", "field", "words"),
    [
        ({}, 422, "$", "missing required field `source`"),
        ({"source": ""}, 422, "$.source", "length >= 1"),
        ({"source": "./models/x"}, 422, "$.source", "local paths are not installed over the API"),
        ({"source": "http://127.0.0.1:9/m.tar.gz"}, 422, "$.source", "private or loopback address"),
        ({"source": "just-a-word"}, 422, "$.source", "nor a catalog id"),
        ({"source": "acme/m", "version": "1.0"}, 422, "$.version", "not a semantic version"),
        ({"source": "acme/m", "task_type": "txt2vec"}, 422, "$.task_type", "Invalid enum value 'txt2vec'"),
        ({"source": "acme/m", "id": "bad id"}, 422, "$.id", "matching regex"),
        ({"source": "acme/m", "metadata": {"resources": {"memory_mb": -1}}}, 422,
         "$.metadata.resources.memory_mb", "> 0"),
        ({"source": "acme/m", "task_type": "txt2txt", "metadata": {"config": {"vector_size": 8}}}, 422,
         "$.metadata.config.vector_size", "embedding models"),
        ({"source": "acme/m", "settings": {"keep_alive": "soon"}}, 422, "$.settings.keep_alive", "duration"),
        ({"source": "acme/m", "colour": 1}, 422, "$", "unknown field `colour`"),
    ],
)  # fmt: skip
async def test_bad_registrations_name_the_field(
    served: AppUnderTest, body: dict[str, Any], status: int, field: str, words: str
) -> None:
    r = await served.client.post("/api/v1/models", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field and words in r.json()["error"]["message"], r.text
    assert [m["id"] for m in (await served.client.get("/api/v1/models")).json()["models"]] == ["echo"]


async def test_operation_and_download_errors(served: AppUnderTest) -> None:
    r = await served.client.get("/api/v1/operations/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "operation_not_found"
    r = await served.client.post("/api/v1/models/echo/download")  # installed from a local folder
    assert r.status_code == 422 and "local folder" in r.json()["error"]["message"]
    r = await served.client.post("/api/v1/models/nope/download")
    assert r.status_code == 404
    r = await served.client.post("/api/v1/models/echo/download", json={"version": "9.9.9"})
    assert r.status_code == 404 and r.json()["error"]["field"] == "version"
    r = await served.client.post("/api/v1/models/echo/download", json={"versions": "1.0.0"})
    assert r.status_code == 422


async def test_registering_needs_the_background_tasks(echo_app: AppUnderTest) -> None:
    r = await echo_app.client.post("/api/v1/models", json={"source": "acme/m", "task_type": "txt2embed"})
    assert r.status_code == 503 and "not accepted now" in r.json()["error"]["message"]
