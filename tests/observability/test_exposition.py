"""The exposition: Prometheus text by default, OpenMetrics when the scraper asks for it; GPU figures
only where NVML answers."""

from __future__ import annotations

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from modelmora.observability import GpuSample, Metrics, ModelSample, Nvml, RuntimeCollector, RuntimeSample

MiB = 2**20


def _sample() -> RuntimeSample:
    models = [
        ModelSample("a", "1.0.0", "txt2embed", "ready", {"critical": 0, "high": 1, "normal": 2, "low": 0}, 1, 42,
                    300 * MiB, "cuda:0", 900 * MiB),
        ModelSample("b", "2.0.0", "txt2txt", "cached", {"critical": 0, "high": 0, "normal": 0, "low": 3}),
    ]  # fmt: skip
    return RuntimeSample(models, 1000 * MiB, 500 * MiB, 50 * MiB, None, 900 * MiB)


class FakeNvml(Nvml):
    def samples(self) -> list[GpuSample]:
        return [GpuSample(0, 0.75, 10 * MiB, 80 * MiB)]


def _values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_runtime_gauges() -> None:
    metrics = Metrics()
    metrics.registry.register(RuntimeCollector(_sample, FakeNvml()))
    body, media_type = metrics.exposition()
    assert media_type == "text/plain; version=0.0.4; charset=utf-8"
    v = _values(body.decode())
    assert v[("modelmora_queue_depth", (("model", "a"), ("priority", "normal"), ("version", "1.0.0")))] == 2
    assert v[("modelmora_queue_depth", (("model", "b"), ("priority", "low"), ("version", "2.0.0")))] == 3
    assert v[("modelmora_active_models", ())] == 1
    assert v[("modelmora_worker_pss_bytes", (("model", "a"), ("pid", "42"), ("version", "1.0.0")))] == 300 * MiB
    assert v[("modelmora_model_resident_bytes", (("device", "cpu"), ("model", "a"), ("version", "1.0.0")))] == 300 * MiB
    assert (
        v[("modelmora_model_resident_bytes", (("device", "cuda:0"), ("model", "a"), ("version", "1.0.0")))] == 900 * MiB
    )
    assert ("modelmora_model_resident_bytes", (("device", "cpu"), ("model", "b"), ("version", "2.0.0"))) not in v
    assert (
        v[("modelmora_model_state", (("model", "b"), ("state", "cached"), ("task", "txt2txt"), ("version", "2.0.0")))]
        == 1
    )
    assert v[("modelmora_memory_budget_bytes", ())] == 1000 * MiB
    assert ("modelmora_vram_budget_bytes", ()) not in v  # unlimited
    assert v[("modelmora_gpu_utilization_ratio", (("gpu", "0"),))] == 0.75
    assert v[("modelmora_gpu_memory_total_bytes", (("gpu", "0"),))] == 80 * MiB


def test_openmetrics_when_asked() -> None:
    metrics = Metrics()
    metrics.model("a", "txt2embed").protocol("rest").ok(0.01)
    body, media_type = metrics.exposition("application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert media_type.startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(body.decode())}
    (total,) = families["modelmora_requests"].samples
    assert total.name == "modelmora_requests_total" and total.value == 1


def test_no_nvml_no_gpu_figures() -> None:
    assert Nvml("libnvidia-ml-that-does-not-exist.so.1").samples() == []


@pytest.mark.parametrize(
    ("outcome", "family", "reason"),
    [
        ("deadline_exceeded", "modelmora_request_cancellations_total", "deadline"),
        ("client_closed_request", "modelmora_request_cancellations_total", "disconnect"),
        ("cancelled", "modelmora_request_cancellations_total", "client"),
        ("queue_full", "modelmora_request_rejections_total", "queue_full"),
        ("insufficient_memory", "modelmora_request_rejections_total", "no_memory"),
    ],
)
def test_outcomes_that_are_cancellations_or_rejections(outcome: str, family: str, reason: str) -> None:
    metrics = Metrics()
    metrics.request_failed("a", "txt2embed", "grpc", outcome, 0.5)
    r = metrics.registry
    assert r.get_sample_value(family, {"model": "a", "reason": reason}) == 1
    labels = {"model": "a", "task": "txt2embed", "protocol": "grpc", "outcome": outcome}
    assert r.get_sample_value("modelmora_requests_total", labels) == 1
    assert r.get_sample_value("modelmora_request_duration_seconds_sum", labels) == 0.5


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    metrics = Metrics()
    child = metrics.model("a", "txt2embed").batch_size
    for items in (1, 2, 3, 4096, 5000):
        child.observe(items)
    r = metrics.registry
    bucket = "modelmora_batch_size_items_bucket"
    assert r.get_sample_value(bucket, {"model": "a", "le": "1.0"}) == 1  # le is inclusive
    assert r.get_sample_value(bucket, {"model": "a", "le": "2.0"}) == 2
    assert r.get_sample_value(bucket, {"model": "a", "le": "4.0"}) == 3
    assert r.get_sample_value(bucket, {"model": "a", "le": "4096.0"}) == 4
    assert r.get_sample_value(bucket, {"model": "a", "le": "+Inf"}) == 5
    assert r.get_sample_value("modelmora_batch_size_items_count", {"model": "a"}) == 5
    assert r.get_sample_value("modelmora_batch_size_items_sum", {"model": "a"}) == 1 + 2 + 3 + 4096 + 5000
    with pytest.raises(ValueError, match="takes labels"):
        metrics.queue_wait.labels("a", "extra")
