"""The start-up check of /dev/shm (`modelmora.shm`), with the file system's room faked through
`os.statvfs`: the rings of two workers by default (a model and its reload's new one; more with
preloaded models), more than a container's default 64 MiB; a shortage is one line naming
/dev/shm, the room free and needed, the settings and the remedies, and `serve` refuses to start
with it. (tests/e2e/test_small_shm.py runs `mm serve` in a real small /dev/shm.)"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from modelmora import shm
from modelmora.registry import SQLiteStore, install
from modelmora.server import StartupError, serve

from conftest import make_settings

MiB = 1 << 20


def _fake_room(monkeypatch: pytest.MonkeyPatch, free: int, total: int | None = None) -> None:
    real = os.statvfs

    def statvfs(path: str | os.PathLike[str]) -> object:
        if str(path) != "/dev/shm":
            return real(path)
        return SimpleNamespace(f_frsize=4096, f_blocks=(total or free) // 4096, f_bavail=free // 4096)

    monkeypatch.setattr(shm.os, "statvfs", statvfs)


def test_the_defaults_need_the_rings_of_two_workers_more_than_64_mib(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    assert shm.ring_bytes(settings) == 32 * MiB + 4096  # two 16 MiB rings and their headers, in pages
    assert shm.workers_at_once(0) == shm.workers_at_once(1) == 2
    assert shm.workers_at_once(3) == 4
    assert shm.shm_needs(settings) == 64 * MiB + 8192 > 64 * MiB
    assert shm.shm_needs(settings, preloaded=3) == 4 * (32 * MiB + 4096)
    small = make_settings(tmp_path, request_ring_mb=1, response_ring_mb=2)
    assert shm.shm_needs(small) == 2 * (3 * MiB + 4096)


def test_preloaded_models_are_counted() -> None:
    assert (
        shm.preloaded_models([{}, {"preload": True}, {"preload": False}, {"preload": True, "max_batch_size": 4}]) == 2
    )


def test_a_shm_without_room_is_one_line_with_the_remedies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_room(monkeypatch, free=60 * MiB, total=64 * MiB)
    with pytest.raises(shm.ShmShortage) as err:
        shm.check_shm_room(make_settings(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        f"/dev/shm has 60.0 MiB free ({60 * MiB} bytes, of 64.0 MiB) but the server needs 64.0 MiB"
        f" ({64 * MiB + 8192} bytes): the shared-memory rings of 2 workers (a model and the new worker of"
        " its reload), each request_ring_mb = 16 + response_ring_mb = 16 MiB. Give /dev/shm more room"
        " (Docker/podman: run --shm-size=128m; Kubernetes: mount an emptyDir with medium: Memory and"
        " sizeLimit: 128Mi at /dev/shm) or lower request_ring_mb / response_ring_mb"
    )


def test_preloaded_models_are_named_and_sized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_room(monkeypatch, free=100 * MiB)
    with pytest.raises(shm.ShmShortage, match=r"rings of 4 workers \(3 preloaded models and one reloading\)") as err:
        shm.check_shm_room(make_settings(tmp_path), preloaded=3)
    assert "--shm-size=256m" in str(err.value)


def test_enough_room_or_no_shm_to_measure_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_room(monkeypatch, free=64 * MiB + 8192)
    shm.check_shm_room(make_settings(tmp_path))

    def missing(path: str | os.PathLike[str]) -> object:
        raise FileNotFoundError(path)

    monkeypatch.setattr(shm.os, "statvfs", missing)
    shm.check_shm_room(make_settings(tmp_path))


@pytest.mark.anyio
async def test_serve_refuses_to_start_counting_the_preloaded_models(
    tmp_path: Path, echo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Room for the default two workers, not for three: a server with two preloaded models
    refuses to start, before it binds its ports or starts a worker."""
    home = tmp_path / "home"
    home.mkdir()
    store = SQLiteStore(home / "registry.sqlite3")
    for model in ("a", "b"):
        install(store, home, str(echo_dir), model_id=model, task="txt2embed")
    settings = make_settings(home, grpc_port=0, port=0)
    _fake_room(monkeypatch, free=2 * shm.ring_bytes(settings))
    shm.check_shm_room(settings)  # one model (or none) and a reload: room enough
    store.update_settings("a", {"preload": True})
    store.update_settings("b", {"preload": True})
    store.close()
    with pytest.raises(StartupError, match=r"^/dev/shm has .* rings of 3 workers \(2 preloaded models"):
        await serve(settings)
