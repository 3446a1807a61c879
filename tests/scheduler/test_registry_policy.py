"""What the registry tells the scheduler: resource hints size a reservation until a worker is
measured, the metadata's config gives settings their defaults, and a version that stops being the
active one serves what it holds, then stops. Fake workers, on asyncio and trio."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_policy import _proc_reads_inline, anyio_backend, result_of, running, settle

from modelmora.lifecycle import ModelState
from modelmora.registry import ModelMetadata, ModelRecord, VersionRecord, parse_metadata

__all__ = ("_proc_reads_inline", "anyio_backend")  # fixtures, used by name

pytestmark = pytest.mark.anyio
MB = 2**20


def record(active: str, *versions: str, metadata: dict[str, Any] | None = None, **settings: Any) -> ModelRecord:
    vrecs = [VersionRecord(v, f"models/m/{v}", size_bytes=100 * MB) for v in versions]
    meta = parse_metadata(metadata) if metadata else ModelMetadata()
    return ModelRecord("m", "txt2embed", "test", active, vrecs, settings=settings, metadata=meta)


async def test_resource_hints_size_the_reservation_until_measured(tmp_path: Path) -> None:
    async with running(tmp_path) as p:
        rt = p.scheduler.runtime_for(record("1.0.0", "1.0.0"))
        estimated = p.scheduler.admission.need_mb(rt)
        assert estimated > 100  # worker base + weights x admission factor
        hinted = record("1.0.0", "1.0.0", metadata={"resources": {"memory_mb": 42, "gpu_vram_mb": 7}})
        p.scheduler.sync([hinted])
        assert p.scheduler.admission.need_mb(rt) == 42
        rt.measured_mb = 50.0
        assert p.scheduler.admission.need_mb(rt) == pytest.approx(55.0)  # measured wins (+10%)


async def test_the_metadata_config_gives_settings_their_defaults(tmp_path: Path) -> None:
    async with running(tmp_path) as p:
        rt = p.scheduler.runtime_for(record("1.0.0", "1.0.0", metadata={"config": {"batch_size": 3}}))
        assert rt.model_settings.max_batch_size == 3
        p.scheduler.sync([record("1.0.0", "1.0.0", metadata={"config": {"batch_size": 3}}, max_batch_size=9)])
        assert rt.model_settings.max_batch_size == 9  # a setting overrides the metadata's default


async def test_a_version_no_longer_active_serves_its_queue_then_stops(tmp_path: Path) -> None:
    async with running(tmp_path) as p:
        v1 = p.scheduler.runtime_for(record("1.0.0", "1.0.0", "2.0.0"))
        first = p.submit(v1, "a")
        await settle(lambda: len(p.workers.batches) == 1)
        queued = p.submit(v1, "b")  # waits behind the running batch
        p.scheduler.sync([record("2.0.0", "1.0.0", "2.0.0")])  # 2.0.0 becomes the active version
        v2 = p.scheduler.runtime_for(record("2.0.0", "1.0.0", "2.0.0"))
        assert v2 is not v1 and v2.key.version == "2.0.0"
        p.workers.batches[0].answer()
        assert await result_of(first) == {"echo": ["a"]}
        await settle(lambda: len(p.workers.batches) == 2)
        p.workers.batches[1].answer()
        assert await result_of(queued) == {"echo": ["b"]}  # served before the worker stopped
        await settle(lambda: v1.state == ModelState.CACHED)
        assert p.workers.workers[0].dead and not p.workers.workers[0].crashed
        assert v1.history[-2][2] == "unload"  # it stopped as a drained unload, not evicted
        # an idle retired version is left alone; a sync that changes nothing retires nothing
        p.scheduler.sync([record("2.0.0", "1.0.0", "2.0.0")])
        assert v1.stop_reason is None
