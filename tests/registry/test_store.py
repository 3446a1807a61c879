"""The registry's contract (`ModelStore`), run against each backend: SQLite and PostgreSQL.

Two stores opened on one registry stand for two replicas (or a server and the `mm` CLI)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pgdb import pg_registry_url

from modelmora.config import ConfigError
from modelmora.errors import RegistryError, StorageUnavailable
from modelmora.registry import ModelMetadata, ModelStore, SQLiteStore, VersionRecord, install, open_store, uninstall

Opener = Callable[[], ModelStore]

__all__ = ("pg_registry_url",)  # fixtures, used by name


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens a store on this test's registry (each call: another connection to the same one)."""
    url = f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    if request.param == "postgres":
        url = request.getfixturevalue("pg_registry_url")
    opened: list[ModelStore] = []

    def open_one() -> ModelStore:
        opened.append(open_store(url, tmp_path))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(opener: Opener) -> ModelStore:
    return opener()


def version(v: str, **kw: object) -> VersionRecord:
    return VersionRecord(v, f"/models/m/{v}", **kw)  # type: ignore[arg-type]


META = ModelMetadata(display_name="M", description="a model", params={"b": 1, "a": [1, None]})


def test_the_first_version_is_active_and_everything_round_trips(store: ModelStore) -> None:
    files = {"z.json": "1" * 64, "a/model.safetensors": "2" * 64}
    rec = store.add_version(
        "m", "txt2embed", "org/m", version("1.0.0", revision="c" * 40, files=files, size_bytes=7), metadata=META
    )
    assert (rec.id, rec.task, rec.source, rec.active_version, rec.active_pinned) == (
        "m",
        "txt2embed",
        "org/m",
        "1.0.0",
        False,
    )
    assert rec.metadata == META and rec.settings == {}
    assert rec.created_at > 0 and rec.updated_at >= rec.created_at
    [v] = rec.versions
    assert (v.revision, v.size_bytes, v.path) == ("c" * 40, 7, "/models/m/1.0.0")
    assert list(v.files.items()) == list(files.items())  # kept in their order
    assert store.get("m") == rec
    assert store.list() == [rec]
    assert store.get("other") is None


def test_versions_activation_and_pinning(store: ModelStore) -> None:
    store.add_version("m", "txt2embed", "org/m", version("1.0.0"))
    rec = store.add_version("m", "txt2embed", "org/m", version("1.1.0"))
    assert rec.active_version == "1.0.0"
    assert [v.version for v in rec.versions] == ["1.0.0", "1.1.0"]
    rec = store.add_version("m", "txt2embed", "org/m", version("2.0.0"), activate=True)
    assert rec.active_version == "2.0.0"
    pinned = store.set_active("m", "1.1.0", pinned=True)
    assert pinned is not None and (pinned.active_version, pinned.active_pinned) == ("1.1.0", True)
    kept = store.set_active("m", "2.0.0")  # pinned=None leaves the pin as it is
    assert kept is not None and (kept.active_version, kept.active_pinned) == ("2.0.0", True)
    unpinned = store.set_active("m", "2.0.0", pinned=False)
    assert unpinned is not None and not unpinned.active_pinned
    assert store.set_active("m", "9.9.9") is None
    assert store.set_active("nope", "1.0.0") is None
    assert store.get("m") == unpinned


def test_a_duplicate_version_is_refused_unless_replaced(store: ModelStore) -> None:
    store.add_version("m", "txt2embed", "org/m", version("1.0.0", revision="a"))
    with pytest.raises(RegistryError, match=r"version 1\.0\.0 is already installed"):
        store.add_version("m", "txt2embed", "org/m", version("1.0.0", revision="b"))
    rec = store.get("m")
    assert rec is not None and rec.versions[0].revision == "a"  # the refused change left nothing
    rec = store.add_version("m", "txt2embed", "org/m", version("1.0.0", revision="b"), replace=True)
    assert [v.revision for v in rec.versions] == ["b"]


def test_metadata_is_kept_unless_given(store: ModelStore) -> None:
    store.add_version("m", "txt2embed", "org/m", version("1.0.0"), metadata=META)
    rec = store.add_version("m", "txt2embed", "org/m", version("1.1.0"))
    assert rec.metadata == META
    other = ModelMetadata(display_name="N")
    rec = store.add_version("m", "txt2embed", "org/m", version("1.2.0"), metadata=other)
    assert rec.metadata == other


def test_listing_filters_by_task_in_id_order(store: ModelStore) -> None:
    for mid, task in [("b", "txt2embed"), ("a", "txt2img"), ("C", "txt2embed"), ("a-2", "txt2embed")]:
        store.add_version(mid, task, f"org/{mid}", version("1.0.0"))
    assert [r.id for r in store.list()] == ["C", "a", "a-2", "b"]  # byte order, as SQLite sorts
    assert [r.id for r in store.list("txt2embed")] == ["C", "a-2", "b"]
    assert [r.id for r in store.list("img2txt")] == []


def test_twenty_five_models_and_three_versions_of_one(store: ModelStore) -> None:
    for i in range(25):
        store.add_version(f"m{i:02d}", "txt2img" if i % 5 == 0 else "txt2embed", f"org/m{i}", version("1.0.0"))
    for v in ("1.1.0", "2.0.0"):
        store.add_version("m07", "txt2embed", "org/m7", version(v))
    listed = store.list()
    assert [r.id for r in listed] == [f"m{i:02d}" for i in range(25)]
    assert [len(r.versions) for r in listed].count(3) == 1
    assert len(store.list("txt2img")) == 5


def test_removing_versions_and_models(store: ModelStore) -> None:
    store.add_version("m", "txt2embed", "org/m", version("1.0.0"))
    store.add_version("m", "txt2embed", "org/m", version("1.1.0"))
    assert store.remove_version("m", "1.0.0") is None  # the active one stays
    assert store.remove_version("m", "3.0.0") is None
    assert store.remove_version("nope", "1.0.0") is None
    after = store.remove_version("m", "1.1.0")
    assert after is not None and [v.version for v in after.versions] == ["1.0.0"]
    gone = store.remove("m")
    assert gone is not None and gone.id == "m" and [v.version for v in gone.versions] == ["1.0.0"]
    assert store.get("m") is None and store.list() == []
    assert store.remove("m") is None


def test_settings_and_metadata_updates_move_updated_at(store: ModelStore) -> None:
    first = store.add_version("m", "txt2embed", "org/m", version("1.0.0"))
    rec = store.update_settings("m", {"pinned": True, "keep_alive": "5m"})
    assert rec is not None and rec.settings == {"pinned": True, "keep_alive": "5m"}
    assert rec.updated_at >= first.updated_at
    rec = store.update_metadata("m", META)
    assert rec is not None and rec.metadata == META and rec.settings == {"pinned": True, "keep_alive": "5m"}
    assert store.update_settings("nope", {}) is None
    assert store.update_metadata("nope", META) is None


def test_two_stores_on_one_registry_see_each_others_changes(opener: Opener) -> None:
    one, two = opener(), opener()
    one.add_version("m", "txt2embed", "org/m", version("1.0.0"))
    two.add_version("m", "txt2embed", "org/m", version("1.1.0"), activate=True)
    rec = one.get("m")
    assert rec is not None and rec.active_version == "1.1.0" and len(rec.versions) == 2
    two.remove("m")
    assert one.list() == []
    one.ping()
    two.ping()


def test_concurrent_registrations_of_one_version_install_it_once(opener: Opener) -> None:
    stores = [opener() for _ in range(4)]
    outcomes: list[str] = []

    def register(s: ModelStore) -> None:
        try:
            s.add_version("m", "txt2embed", "org/m", version("1.0.0"))
            outcomes.append("ok")
        except RegistryError:
            outcomes.append("refused")

    threads = [threading.Thread(target=register, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok", "refused", "refused", "refused"]
    rec = stores[0].get("m")
    assert rec is not None and [v.version for v in rec.versions] == ["1.0.0"]


@pytest.mark.anyio
async def test_the_async_variants(store: ModelStore) -> None:
    store.add_version("m", "txt2embed", "org/m", version("1.0.0"))
    store.add_version("m", "txt2embed", "org/m", version("1.1.0"))
    assert [r.id for r in await store.alist("txt2embed")] == ["m"]
    rec = await store.aset_active("m", "1.1.0", pinned=True)
    assert rec is not None and rec.active_pinned
    assert (await store.aupdate_settings("m", {"pinned": True})) is not None
    assert (await store.aupdate_metadata("m", META)) is not None
    got = await store.aget("m")
    assert got is not None and got.metadata == META and got.settings == {"pinned": True}
    await store.aping()
    assert (await store.aremove("m")) is not None
    assert await store.aget("m") is None


def test_install_and_uninstall_through_the_store(store: ModelStore, tmp_path: Path, echo_dir: Path) -> None:
    home = tmp_path / "home"
    rec = install(store, home, str(echo_dir), model_id="echo", task="txt2embed", check_files=False)
    assert rec.versions[0].files and Path(rec.versions[0].path).is_dir()
    rec = install(store, home, str(echo_dir), model_id="echo", task="txt2embed", version="1.1.0", check_files=False)
    assert [v.version for v in rec.versions] == ["1.0.0", "1.1.0"]
    uninstall(store, home, "echo")
    assert store.get("echo") is None and not (home / "models" / "echo").exists()


# -- PostgreSQL only ------------------------------------------------------------------------


def test_postgres_migrates_once_and_reopens(pg_registry_url: str, tmp_path: Path) -> None:
    import asyncio

    import asyncpg

    from modelmora.registry.postgres import PG_SCHEMA_VERSION

    first = open_store(pg_registry_url, tmp_path)
    first.add_version("m", "txt2embed", "org/m", version("1.0.0"))
    first.close()
    first.close()  # closing twice is harmless
    again = open_store(pg_registry_url, tmp_path)  # opening a current schema changes nothing
    assert [r.id for r in again.list()] == ["m"]
    again.close()

    async def schema() -> list[tuple[str, int]]:
        conn = await asyncpg.connect(pg_registry_url)
        try:
            return [tuple(r) for r in await conn.fetch("SELECT name, version FROM modelmora_schema")]
        finally:
            await conn.close()

    assert asyncio.run(schema()) == [("registry", PG_SCHEMA_VERSION)]


def test_postgres_shares_a_database_with_the_job_store(pg_registry_url: str, tmp_path: Path) -> None:
    import asyncio

    from modelmora.jobs.postgres import PostgresJobStore

    async def open_jobs() -> None:
        jobs = await PostgresJobStore.open(pg_registry_url)
        await jobs.aclose()

    asyncio.run(open_jobs())
    store = open_store(pg_registry_url, tmp_path)
    store.add_version("m", "txt2embed", "org/m", version("1.0.0"))
    assert [r.id for r in store.list()] == ["m"]
    store.close()


def test_an_unreachable_postgres_is_one_clear_error_without_the_password(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://user:secret@127.0.0.1:{port}/db"
    with pytest.raises(StorageUnavailable) as caught:
        open_store(url, tmp_path)
    assert f"cannot open the registry postgresql://***@127.0.0.1:{port}/db:" in caught.value.message
    assert "secret" not in caught.value.message


def test_a_missing_postgres_database_is_one_clear_error(pg_registry_url: str, tmp_path: Path) -> None:
    url = pg_registry_url.rsplit("/", 1)[0] + "/mm_no_such_database"
    with pytest.raises(StorageUnavailable, match=r"cannot open the registry .*mm_no_such_database.* does not exist"):
        open_store(url, tmp_path)


def test_other_registry_urls_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mysql://\*\*\*@db/x: unsupported registry_url"):
        open_store("mysql://u:p@db/x", tmp_path)
    default = open_store("", tmp_path)
    assert isinstance(default, SQLiteStore)
    default.close()


def test_postgres_connections_cut_by_the_server_are_a_clear_error_then_reconnected(
    pg_registry_url: str, tmp_path: Path
) -> None:
    import asyncio

    import asyncpg

    store = open_store(pg_registry_url, tmp_path)
    store.add_version("m", "txt2embed", "org/m", version("1.0.0"))
    database = pg_registry_url.rsplit("/", 1)[1]

    async def terminate() -> None:
        conn = await asyncpg.connect(pg_registry_url)
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                database,
            )
        finally:
            await conn.close()

    asyncio.run(terminate())
    outcomes = []
    try:
        for _ in range(3):  # the pool's dead connection fails one call at most, then is replaced
            try:
                outcomes.append(store.get("m") is not None)
            except StorageUnavailable as exc:
                assert f"/{database} cannot be read or written now: " in exc.message
                outcomes.append(False)
    finally:
        store.close()
    assert outcomes[-1] and outcomes.count(False) <= 1
