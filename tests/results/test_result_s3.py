"""The S3 result store against a real SeaweedFS server: upload, presigned GET, tampering, expiry,
unreachable or refused buckets. asyncio only (aiobotocore)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
from aiobotocore.session import get_session
from botocore.config import Config
from structlog.testing import capture_logs

from modelmora.config import ConfigError, S3Settings, Settings
from modelmora.results import ResultStoreUnavailable, open_result_store
from modelmora.results.s3 import S3ResultStore, _endpoint_label, open_s3_store

from s3server import SeaweedS3

pytestmark = pytest.mark.anyio

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 300


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def s3_client(seaweed: SeaweedS3, **config: Any) -> Any:
    """An aiobotocore client of the test server (an async context manager)."""
    return get_session().create_client(
        "s3",
        endpoint_url=seaweed.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=seaweed.access_key,
        aws_secret_access_key=seaweed.secret_key,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, **config),
    )


@pytest.fixture
async def bucket(seaweed: SeaweedS3) -> AsyncIterator[str]:
    """A fresh bucket for one test, created with aiobotocore."""
    name = f"mm-{uuid.uuid4().hex[:12]}"
    async with s3_client(seaweed) as client:
        await client.create_bucket(Bucket=name)
        yield name


def s3_settings(tmp_path: Path, seaweed: SeaweedS3, bucket: str, **overrides: Any) -> Settings:
    s3 = {
        "bucket": bucket,
        "endpoint_url": seaweed.endpoint_url,
        "access_key_id": seaweed.access_key,
        "secret_access_key": seaweed.secret_key,
        **overrides.pop("s3", {}),
    }
    return Settings(home=str(tmp_path / "home"), result_store="s3", s3=S3Settings(**s3), **overrides)


async def test_put_then_presigned_get(tmp_path: Path, seaweed: SeaweedS3, bucket: str) -> None:
    async with open_result_store(s3_settings(tmp_path, seaweed, bucket, result_ttl_s=300)) as store:
        assert isinstance(store, S3ResultStore)
        assert store.kind == "s3"
        result = await store.put(PNG, content_type="image/png", suffix=".png")
    assert result.url.startswith(f"{seaweed.endpoint_url}/{bucket}/modelmora/results/")
    assert ".png?" in result.url
    assert "X-Amz-Expires=300" in result.url
    assert seaweed.secret_key not in result.url
    async with httpx.AsyncClient() as http:
        r = await http.get(result.url)
        assert r.status_code == 200
        assert r.content == PNG
        assert r.headers["content-type"] == "image/png"
        # tampered signature, tampered key, no signature at all
        sig_at = result.url.index("X-Amz-Signature=") + len("X-Amz-Signature=")
        flipped = "0" if result.url[sig_at] != "0" else "1"
        assert (await http.get(result.url[:sig_at] + flipped + result.url[sig_at + 1 :])).status_code == 403
        assert (await http.get(result.url.replace(".png?", ".jpg?"))).status_code == 403
        assert (await http.get(result.url.split("?", 1)[0])).status_code == 403


async def test_presigned_url_expires(tmp_path: Path, seaweed: SeaweedS3, bucket: str) -> None:
    async with open_s3_store(s3_settings(tmp_path, seaweed, bucket, result_ttl_s=1)) as store:
        result = await store.put(b"short-lived", content_type="application/octet-stream", suffix="")
        # the same object at a long-lived URL (the 1 s one may be over before a busy machine fetches it)
        key = urlsplit(result.url).path.removeprefix(f"/{bucket}/")
        params = {"Bucket": bucket, "Key": key}
        long_lived = await store._client.generate_presigned_url("get_object", Params=params, ExpiresIn=300)
    assert "X-Amz-Expires=1&" in result.url
    async with httpx.AsyncClient() as http:
        assert (await http.get(long_lived)).content == b"short-lived"
        await anyio.sleep(2.1)
        r = await http.get(result.url)
        assert r.status_code == 403
        assert b"expired" in r.content


async def test_missing_bucket_is_503_without_credentials(tmp_path: Path, seaweed: SeaweedS3) -> None:
    settings = s3_settings(tmp_path, seaweed, f"mm-missing-{uuid.uuid4().hex[:8]}")
    async with open_s3_store(settings, max_attempts=1) as store:
        with pytest.raises(ResultStoreUnavailable) as info:
            await store.put(PNG, content_type="image/png", suffix=".png")
    err = info.value
    assert (err.http_status, err.code, err.retry_after_s) == (503, "result_store_unavailable", 5.0)
    assert "NoSuchBucket" in err.message
    assert settings.s3.bucket in err.message
    assert seaweed.access_key not in err.message
    assert seaweed.secret_key not in err.message


async def test_wrong_credentials_are_503_without_credentials(tmp_path: Path, seaweed: SeaweedS3, bucket: str) -> None:
    wrong = "wrong-secret-key-0123456789"
    settings = s3_settings(tmp_path, seaweed, bucket, s3={"secret_access_key": wrong})
    async with open_s3_store(settings, max_attempts=1) as store:
        with pytest.raises(ResultStoreUnavailable) as info:
            await store.put(PNG, content_type="image/png", suffix=".png")
    message = info.value.message
    assert "refused the upload" in message
    assert wrong not in message
    assert seaweed.access_key not in message
    assert seaweed.secret_key not in message


async def test_unreachable_endpoint_is_503(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings(
        home=str(tmp_path),
        result_store="s3",
        s3=S3Settings(
            bucket="b",
            endpoint_url=f"http://127.0.0.1:{port}",
            access_key_id="AKIDEXAMPLE",
            secret_access_key="wJalrXUtnFEMIEXAMPLE",
        ),
    )
    async with open_s3_store(settings, max_attempts=1) as store:
        with pytest.raises(ResultStoreUnavailable, match="cannot reach the S3 endpoint") as info:
            await store.put(b"x", content_type="image/png", suffix=".png")
    message = info.value.message
    assert f"http://127.0.0.1:{port}" in message
    for secret in ("AKIDEXAMPLE", "wJalrXUtnFEMIEXAMPLE"):
        assert secret not in message


async def test_bad_suffix(tmp_path: Path, seaweed: SeaweedS3, bucket: str) -> None:
    async with open_s3_store(s3_settings(tmp_path, seaweed, bucket)) as store:
        with pytest.raises(ValueError, match="bad result suffix"):
            await store.put(b"x", content_type="image/png", suffix="/../x")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"s3": S3Settings()}, r"s3\.bucket"),
        ({"s3": S3Settings(bucket="b", access_key_id="AK")}, "together"),
        ({"s3": S3Settings(bucket="b"), "result_ttl_s": 8 * 86400.0}, "7 days"),
        ({"s3": S3Settings(bucket="b"), "result_ttl_s": 0.0}, "result_ttl_s"),
        ({"s3": S3Settings(bucket="b", endpoint_url="http://u:pa55@minio:9000")}, "must not hold credentials"),
        ({"s3": S3Settings(bucket="b", endpoint_url="minio:9000")}, "http"),
        ({"s3": S3Settings(bucket="b", endpoint_url="http://minio:port")}, "http"),
    ],
)
async def test_configuration_errors(tmp_path: Path, overrides: dict[str, Any], match: str) -> None:
    settings = Settings(home=str(tmp_path), result_store="s3", **overrides)
    with pytest.raises(ConfigError, match=match):
        async with open_result_store(settings):
            pass


def test_endpoint_label() -> None:
    assert _endpoint_label("") == "AWS S3"
    assert _endpoint_label("https://u:p@minio.local:9000/path") == "https://minio.local:9000"
    assert _endpoint_label("http://[::1]:9000") == "http://[::1]:9000"
    assert _endpoint_label("https://s3.eu-west-1.amazonaws.com") == "https://s3.eu-west-1.amazonaws.com"


class _Broken:
    """A client whose upload fails the way botocore fails without credentials or on odd errors."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def generate_presigned_url(self, *args: Any, **kwargs: Any) -> str:
        return "http://s3.invalid/b/p/x.png?X-Amz-Signature=0"

    async def put_object(self, **kwargs: Any) -> None:
        raise self.exc


async def test_other_botocore_errors_are_503() -> None:
    from botocore.exceptions import NoCredentialsError, ParamValidationError

    store = S3ResultStore(_Broken(NoCredentialsError()), "b", prefix="p/", ttl_s=60)
    with pytest.raises(ResultStoreUnavailable, match="no S3 credentials"):
        await store.put(b"x", content_type="image/png", suffix=".png")
    store = S3ResultStore(_Broken(ParamValidationError(report="bad")), "b", prefix="p/", ttl_s=60)
    with pytest.raises(ResultStoreUnavailable, match=r"failed \(ParamValidationError\)"):
        await store.put(b"x", content_type="image/png", suffix=".png")


async def _keys(store: S3ResultStore, prefix: str = "") -> set[str]:
    resp = await store._client.list_objects_v2(Bucket=store.bucket, Prefix=prefix)
    return {o["Key"] for o in resp.get("Contents", [])}


async def test_sweep_deletes_only_expired_results(tmp_path: Path, seaweed: SeaweedS3, bucket: str) -> None:
    settings = s3_settings(tmp_path, seaweed, bucket, result_ttl_s=300, s3={"delete_expired": False})
    async with open_s3_store(settings) as store:
        past = S3ResultStore(store._client, bucket, prefix=store.prefix, ttl_s=300, clock=lambda: 1_000_000_000.0)
        old = [await past.put(PNG, content_type="image/png", suffix=".png") for _ in range(3)]
        fresh = await store.put(PNG, content_type="image/png", suffix=".png")
        others = [
            f"{store.prefix}notes.txt",
            f"{store.prefix}sub/1000-{uuid.uuid4().hex}.png",
            f"1000-{uuid.uuid4().hex}",
        ]
        for key in others:
            await store._client.put_object(Bucket=bucket, Key=key, Body=b"not ours")
        assert len(await _keys(store)) == 3 + 1 + len(others)
        # within the grace after expiry nothing goes
        assert await store.sweep(now=1_000_000_000 + 300 + 30) == 0
        assert await store.sweep() == 3
        left = await _keys(store)
        assert left == {urlsplit(fresh.url).path.removeprefix(f"/{bucket}/"), *others}
        assert await store.sweep() == 0
    async with httpx.AsyncClient() as http:
        assert (await http.get(fresh.url)).content == PNG
        assert (await http.get(old[0].url)).status_code in (403, 404)


async def test_sweep_reads_only_one_page_of_live_results(tmp_path: Path, seaweed: SeaweedS3, bucket: str) -> None:
    settings = s3_settings(tmp_path, seaweed, bucket, s3={"delete_expired": False})
    async with open_s3_store(settings) as store:
        pages: list[int] = []
        real = store._client.get_paginator

        def counting(name: str) -> Any:
            paginator = real(name)
            paginate = paginator.paginate

            async def pages_of(**kwargs: Any) -> Any:
                async for page in paginate(**kwargs, PaginationConfig={"PageSize": 2}):
                    pages.append(len(page.get("Contents", [])))
                    yield page

            paginator.paginate = pages_of
            return paginator

        store._client.get_paginator = counting
        past = S3ResultStore(store._client, bucket, prefix=store.prefix, ttl_s=60, clock=lambda: 1_000_000_000.0)
        for _ in range(3):
            await past.put(b"old", content_type="application/octet-stream", suffix="")
        for _ in range(5):
            await store.put(b"live", content_type="application/octet-stream", suffix="")
        assert await store.sweep() == 3
        assert pages == [2, 2]  # two expired, then one expired and one live: the listing stops there
        assert len(await _keys(store)) == 5


async def test_the_store_sweeps_while_open_unless_told_not_to(tmp_path: Path, seaweed: SeaweedS3, bucket: str) -> None:
    expired = f"modelmora/results/1000-{uuid.uuid4().hex}.png"
    async with open_s3_store(s3_settings(tmp_path, seaweed, bucket, s3={"delete_expired": False})) as store:
        await store._client.put_object(Bucket=bucket, Key=expired, Body=b"x")
        await store.put(b"live", content_type="application/octet-stream", suffix="")
        await anyio.sleep(0.5)
        assert expired in await _keys(store)
    async with open_s3_store(s3_settings(tmp_path, seaweed, bucket)) as store:
        for _ in range(200):  # the sweeper's first pass runs as the store opens
            if expired not in await _keys(store):
                break
            await anyio.sleep(0.05)
        assert len(await _keys(store)) == 1


async def test_sweeper_survives_failures_and_warns_once(seaweed: SeaweedS3) -> None:
    async with s3_client(seaweed, retries={"max_attempts": 1}) as client:
        store = S3ResultStore(client, f"missing-{uuid.uuid4().hex[:8]}", prefix="p/", ttl_s=60)
        with capture_logs() as logs:
            with anyio.move_on_after(1.0):
                await store.run_sweeper(0.05)
    failures = [e for e in logs if e["event"] == "result_sweep_failed"]
    assert len(failures) >= 3
    assert [e["log_level"] for e in failures[:2]] == ["warning", "debug"]
    assert failures[0]["error"] == "NoSuchBucket"
    assert seaweed.secret_key not in str(failures)
