"""The filesystem result store: signed URLs served by the real Starlette route, expiry, sweeping,
the persistent secret, refused names. Runs on asyncio and trio."""

from __future__ import annotations

import os
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import msgspec
import pytest
from starlette.applications import Starlette

from modelmora.config import ConfigError, S3Settings, Settings
from modelmora.errors import Forbidden
from modelmora.results import (
    RESULTS_PATH,
    FilesystemResultStore,
    ResultNotFound,
    ResultStoreUnavailable,
    StoredResult,
    absolute_url,
    content_type_for,
    load_or_create_secret,
    open_result_store,
    result_route,
)

pytestmark = pytest.mark.anyio

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 400


class Clock:
    """A settable unix clock."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def client_for(*stores: FilesystemResultStore) -> httpx.AsyncClient:
    """A client of a Starlette app serving the first store (the app the REST layer would mount it in)."""
    app = Starlette(routes=[result_route(stores[0])])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait until `check()` is true (polled), failing after `timeout_s`."""
    with anyio.fail_after(timeout_s):
        while not check():  # noqa: ASYNC110
            await anyio.sleep(0.01)


def listing(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.exists() else []


def parts(result: StoredResult) -> tuple[str, str, str]:
    """(name, expires, sig) of a filesystem result URL."""
    split = urlsplit(result.url)
    query = parse_qs(split.query)
    return split.path.removeprefix(RESULTS_PATH), query["expires"][0], query["sig"][0]


def error_of(response: httpx.Response) -> dict[str, str]:
    body = msgspec.json.decode(response.content)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert response.headers["content-type"] == "application/json"
    return dict(body["error"])


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(home: Path, clock: Clock) -> FilesystemResultStore:
    return FilesystemResultStore(home / "results", b"k" * 32, ttl_s=600, clock=clock)


@pytest.fixture
async def client(store: FilesystemResultStore) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(store) as c:
        yield c


async def test_put_then_fetch_exact_bytes(home: Path) -> None:
    settings = Settings(home=str(home), result_ttl_s=120)
    async with open_result_store(settings) as opened:
        assert isinstance(opened, FilesystemResultStore)
        assert opened.kind == "filesystem"
        before = time.time()
        result = await opened.put(PNG, content_type="image/png", suffix=".png")
        assert result.url.startswith("/api/v1/results/")
        assert before + 120 <= result.expires_at <= time.time() + 121
        name, expires, _ = parts(result)
        assert int(expires) == result.expires_at
        path = home / "results" / name
        assert path.read_bytes() == PNG
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        async with client_for(opened) as c:
            r = await c.get(result.url)
            assert r.status_code == 200
            assert r.content == PNG
            assert r.headers["content-type"] == "image/png"
            assert r.headers["x-content-type-options"] == "nosniff"
            cache = r.headers["cache-control"]
            assert cache.startswith("private, max-age=")
            assert 110 <= int(cache.rsplit("=", 1)[1]) <= 121
            head = await c.head(result.url)
            assert head.status_code == 200
            assert head.headers["content-length"] == str(len(PNG))
            assert head.content == b""
            text = await opened.put(b"hello", content_type="text/plain", suffix=".txt")
            r = await c.get(text.url)
            assert (r.content, r.headers["content-type"]) == (b"hello", "text/plain; charset=utf-8")
    assert listing(home / "results") == sorted([path, path.parent / parts(text)[0]])


async def test_public_url_gives_absolute_urls(home: Path) -> None:
    settings = Settings(home=str(home), public_url="https://mm.example.com/base/")
    async with open_result_store(settings) as opened:
        assert isinstance(opened, FilesystemResultStore)
        result = await opened.put(PNG, content_type="image/png", suffix=".png")
        assert result.url.startswith("https://mm.example.com/base/api/v1/results/")
        assert absolute_url(result.url, "http://other:8000/") == result.url
        async with client_for(opened) as c:
            r = await c.get(result.url.removeprefix("https://mm.example.com/base"))
            assert r.content == PNG


def test_absolute_url_and_content_types() -> None:
    assert absolute_url("/api/v1/results/x?sig=1", "http://h:8000/") == "http://h:8000/api/v1/results/x?sig=1"
    assert absolute_url("/api/v1/results/x", "http://h:8000") == "http://h:8000/api/v1/results/x"
    assert absolute_url("https://s3/x", "http://h:8000/") == "https://s3/x"
    assert content_type_for(".webp") == "image/webp"
    assert content_type_for("") == "application/octet-stream"
    assert content_type_for(".html") == "text/html"
    assert content_type_for(".zzzqq") == "application/octet-stream"


async def test_tampered_or_missing_signature_is_403(
    store: FilesystemResultStore, client: httpx.AsyncClient, clock: Clock
) -> None:
    result = await store.put(PNG, content_type="image/png", suffix=".png")
    name, expires, sig = parts(result)
    base = RESULTS_PATH + name
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    for query in (
        {"expires": expires, "sig": flipped},
        {"expires": str(int(expires) + 3600), "sig": sig},  # a longer life is not signed
        {"expires": expires, "sig": sig[:-2]},
        {"expires": expires, "sig": "zz" + sig[2:]},
        {"expires": "1e9", "sig": sig},
        {"expires": "\u0661" * 10, "sig": sig},  # Arabic-Indic digits are not digits here
    ):
        r = await client.get(base, params=query)
        assert r.status_code == 403, query
        assert error_of(r) == {"code": "forbidden", "message": "signature does not match"}
    for query in ({"expires": expires}, {"sig": sig}, {}):
        r = await client.get(base, params=query)
        assert r.status_code == 403
        assert error_of(r)["code"] == "forbidden"
        assert "no signature" in error_of(r)["message"]
    # the same URL with another store's secret is refused too
    other = FilesystemResultStore(store.directory, b"other-secret", ttl_s=600, clock=clock)
    async with client_for(other) as c:
        assert (await c.get(result.url)).status_code == 403
    # an upper-case signature is the same signature
    r = await client.get(base, params={"expires": expires, "sig": sig.upper()})
    assert r.status_code == 200


async def test_expired_url_is_403(store: FilesystemResultStore, client: httpx.AsyncClient, clock: Clock) -> None:
    result = await store.put(PNG, content_type="image/png", suffix=".png")
    assert (await client.get(result.url)).status_code == 200
    clock.now = result.expires_at
    r = await client.get(result.url)
    assert r.status_code == 403
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(result.expires_at))
    assert error_of(r) == {"code": "forbidden", "message": f"this URL expired at {when}"}
    # a correctly signed URL whose expiry has passed (the file is still there)
    name, _, _ = parts(result)
    clock.now = time.time()
    past = int(clock.now) - 5
    r = await client.get(store.url_for(name, past))
    assert r.status_code == 403
    assert "expired at" in error_of(r)["message"]


async def test_real_ttl_expires(home: Path) -> None:
    store = FilesystemResultStore(home / "results", b"s", ttl_s=0.01)
    result = await store.put(b"x", content_type="application/octet-stream", suffix="")
    async with client_for(store) as c:
        await until(lambda: time.time() >= result.expires_at)
        r = await c.get(result.url)
        assert r.status_code == 403
        assert "expired" in error_of(r)["message"]


async def test_swept_file_is_404(store: FilesystemResultStore, client: httpx.AsyncClient, clock: Clock) -> None:
    keep = await store.put(b"keep", content_type="image/png", suffix=".png")
    clock.now += 1000
    gone = await store.put(PNG, content_type="image/png", suffix=".png")
    clock.now -= 1000
    (store.directory / "notes.txt").write_bytes(b"not ours")
    # the sweeper judges by the expiry in the names (plus its grace), not by the URL
    assert store.sweep(now=keep.expires_at + 61) == 1
    assert (store.directory / "notes.txt").exists()
    r = await client.get(keep.url)
    assert r.status_code == 404
    assert error_of(r)["code"] == "result_not_found"
    assert (await client.get(gone.url)).content == PNG
    assert store.sweep(now=gone.expires_at + 30) == 0  # within the grace
    assert store.sweep(now=gone.expires_at + 61) == 1


async def test_background_sweeper(home: Path, clock: Clock) -> None:
    store = FilesystemResultStore(home / "results", b"k", ttl_s=10, sweep_grace_s=0, clock=clock)
    result = await store.put(PNG, content_type="image/png", suffix=".png")
    path = store.directory / parts(result)[0]
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.run_sweeper, 0.01)
        await anyio.sleep(0.05)
        assert path.exists()
        clock.now = result.expires_at + 1
        await until(lambda: not path.exists())
        # a vanished directory is logged, not fatal
        store.directory.rmdir()
        await anyio.sleep(0.05)
        store.directory.mkdir()
        result = await store.put(PNG, content_type="image/png", suffix=".png")
        clock.now = result.expires_at + 1
        await until(lambda: not listing(store.directory))
        tg.cancel_scope.cancel()


async def test_open_sweeps_leftovers_at_start(home: Path) -> None:
    results = home / "results"
    results.mkdir(parents=True)
    old = results / f"1000-{uuid.uuid4().hex}.png"
    old.write_bytes(b"old")
    fresh = results / f"{int(time.time()) + 3600}-{uuid.uuid4().hex}.png"
    fresh.write_bytes(b"fresh")
    stale_tmp = results / ".tmp-crashed"
    stale_tmp.write_bytes(b"partial")
    os.utime(stale_tmp, (time.time() - 7200, time.time() - 7200))
    new_tmp = results / ".tmp-writing"
    new_tmp.write_bytes(b"partial")
    foreign = results / "README"
    foreign.write_bytes(b"keep me")
    async with open_result_store(Settings(home=str(home))):
        await until(lambda: not old.exists() and not stale_tmp.exists())
    assert fresh.exists() and new_tmp.exists() and foreign.exists()


async def test_secret_persists_across_restarts(home: Path) -> None:
    settings = Settings(home=str(home))
    async with open_result_store(settings) as first:
        assert isinstance(first, FilesystemResultStore)
        result = await first.put(PNG, content_type="image/png", suffix=".png")
    secret_file = home / "result_secret"
    content = secret_file.read_text()
    assert len(content.strip()) == 64
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    async with open_result_store(settings) as second:
        assert isinstance(second, FilesystemResultStore)
        assert second is not first
        async with client_for(second) as c:
            r = await c.get(result.url)
            assert r.status_code == 200
            assert r.content == PNG
    assert secret_file.read_text() == content
    assert not [p for p in listing(home) if p.name.startswith(".tmp-")]


async def test_configured_secret_is_shared_by_replicas(tmp_path: Path) -> None:
    a = Settings(home=str(tmp_path / "a"), result_secret="shared")
    b = Settings(home=str(tmp_path / "b"), result_secret="shared")
    c = Settings(home=str(tmp_path / "c"), result_secret="different")
    async with open_result_store(a) as sa, open_result_store(b) as sb, open_result_store(c) as sc:
        assert isinstance(sa, FilesystemResultStore)
        assert isinstance(sb, FilesystemResultStore)
        assert isinstance(sc, FilesystemResultStore)
        result = await sa.put(PNG, content_type="image/png", suffix=".png")
        name, expires, sig = parts(result)
        assert sb.verify(name, expires, sig) == int(expires)
        with pytest.raises(Forbidden, match="signature does not match"):
            sc.verify(name, expires, sig)
    assert not (tmp_path / "a" / "result_secret").exists()


def test_secret_file_errors(tmp_path: Path) -> None:
    (tmp_path / "result_secret").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_or_create_secret(tmp_path)
    (tmp_path / "result_secret").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="cannot read"):
        load_or_create_secret(tmp_path)
    assert load_or_create_secret(tmp_path, "configured") == b"configured"


async def test_path_traversal_refused(
    home: Path, store: FilesystemResultStore, client: httpx.AsyncClient, clock: Clock
) -> None:
    secret_path = home / "result_secret"
    secret_path.parent.mkdir(parents=True, exist_ok=True)
    secret_path.write_text("top secret")
    far = int(clock.now) + 3600
    # even correctly signed, a name that is not a result file name is refused
    for name in ("../result_secret", "..", ".", "result_secret", f"{far}-{'a' * 32}.png/..", f"{far}-{'A' * 32}.png"):
        response = await store.respond(name, str(far), store.sign(name, far))
        assert response.status_code == 404, name
        assert b"top secret" not in bytes(response.body)
        with pytest.raises(ResultNotFound):
            store.verify(name, str(far), store.sign(name, far))
    for raw in ("..%2Fresult_secret", "%2E%2E%2Fresult_secret", "..%5Cresult_secret", "..", "%2E%2E"):
        r = await client.get(f"{RESULTS_PATH}{raw}", params={"expires": str(far), "sig": "0" * 64})
        assert r.status_code in (403, 404), raw
        assert b"top secret" not in r.content


async def test_put_validation_and_write_failure(store: FilesystemResultStore) -> None:
    for suffix in ("png", ".PNG", "/../x.png", ".p/g", ".png\n", ".toolongsuffix"):
        with pytest.raises(ValueError, match="bad result suffix"):
            await store.put(b"x", content_type="image/png", suffix=suffix)
    with pytest.raises(ValueError, match="does not match suffix"):
        await store.put(b"x", content_type="image/jpeg", suffix=".png")
    assert (await store.put(b"x", content_type="IMAGE/PNG", suffix=".png")).url
    for name in os.listdir(store.directory):
        os.unlink(store.directory / name)
    store.directory.rmdir()
    with pytest.raises(ResultStoreUnavailable) as info:
        await store.put(b"x", content_type="image/png", suffix=".png")
    assert (info.value.http_status, info.value.code) == (503, "result_store_unavailable")
    assert str(store.directory) not in info.value.message
    with pytest.raises(ValueError, match="ttl_s"):
        FilesystemResultStore(store.directory, b"k", ttl_s=0)
    with pytest.raises(ValueError, match="secret"):
        FilesystemResultStore(store.directory, b"", ttl_s=1)


async def test_open_result_store_variants(home: Path) -> None:
    async with open_result_store(Settings(home=str(home), result_store="inline")) as none:
        assert none is None
    assert not listing(home)
    with pytest.raises(ConfigError, match="result_ttl_s"):
        async with open_result_store(Settings(home=str(home), result_ttl_s=0)):
            pass
    with pytest.raises(ConfigError, match=r"s3\.bucket"):
        async with open_result_store(Settings(home=str(home), result_store="s3")):
            pass
    # an error in the body comes out as itself, not wrapped in an exception group
    with pytest.raises(KeyError):
        async with open_result_store(Settings(home=str(home))):
            raise KeyError("boom")


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_s3_store_needs_asyncio(home: Path) -> None:
    settings = Settings(home=str(home), result_store="s3", s3=S3Settings(bucket="b"))
    with pytest.raises(RuntimeError, match="asyncio"):
        async with open_result_store(settings):
            pass
