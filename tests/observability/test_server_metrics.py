"""Metrics, logs and trace context of a real `mm serve` (Echo pipeline, spawned workers, JSON logs at
debug level), after real requests: the scraped values match what was done, every line the server
and its workers wrote is JSON, and a request's trace id comes back and appears in its supervisor
and worker lines."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ECHO_LAYOUT, TESTS_DIR
from serverproc import ServerProcess, mm

pytestmark = pytest.mark.slow  # a real server process

MiB = 2**20
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _model_dir(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "weights.bin").write_bytes(b"\0" * 16)
    for file in ECHO_LAYOUT:
        (d / file).write_text("{}")
    return d


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Models `echo` (queue limit 1) and `other`. The budget (1000 MiB) holds one worker estimated at
    990 MiB: loading `other` evicts `echo`."""
    root = tmp_path_factory.mktemp("obs")
    home = root / "home"
    for name in ("echo", "other"):
        mm("install", str(_model_dir(root, name)), "--id", name, "--task", "txt2embed", home=home)
    mm("set", "echo", "--queue-limit", "1", home=home)
    env = {
        "MODELMORA_PIPELINES__TXT2EMBED": "worker_pipelines:Echo",
        "MODELMORA_ZYGOTE": "false",
        "MODELMORA_ZYGOTE_PRELOAD": "numpy",
        "MODELMORA_TORCH_THREADS": "1",
        "MODELMORA_WORKER_BASE_MB": "990",
        "MODELMORA_MEMORY_BUDGET_MB": "1000",
        "MODELMORA_LOG_LEVEL": "debug",
        "MODELMORA_LOG_FORMAT": "json",
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p),
    }
    srv = ServerProcess(home, env).start()
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-5000:]


def scrape(url: str, path: str = "/metrics") -> Samples:
    r = httpx.get(url + path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):  # raises on anything that does not parse
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def infer(url: str, text: Any, model: str = "echo", **extra: Any) -> httpx.Response:
    headers = extra.pop("headers", None)
    timeout = extra.pop("timeout", 60)
    return httpx.post(
        f"{url}/api/v1/infer/{model}", json={"input_data": {"text": text}, **extra}, headers=headers, timeout=timeout
    )


def wait_for(check: Callable[[], bool], what: str, limit_s: float = 60) -> None:
    """Poll until `check()` (a safety net: the limit is for a hung server, not a performance bound)."""
    deadline = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def status_of(url: str, model: str) -> dict[str, Any]:
    return next(m for m in httpx.get(f"{url}/api/v1/status").json()["models"] if m["model_id"] == model)


def in_background(fn: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[httpx.Response]]:
    out: list[httpx.Response] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    return t, out


def test_a_scripted_workload_is_what_the_metrics_say(server: ServerProcess) -> None:
    url = server.url
    before = scrape(url)
    rest = {"task": "txt2embed", "protocol": "rest"}
    # three answers; the first waits for the model's load (a cold start)
    for text in ("a", "bb", ["c", "d", "e"]):
        assert infer(url, text).status_code == 200
    # refused: an invalid field, an unknown model (counted without a model label), a malformed body
    assert infer(url, []).status_code == 422
    assert infer(url, "x", model="no-such-model").status_code == 404
    assert (
        httpx.post(f"{url}/api/v1/infer/echo", content=b"{", headers={"content-type": "application/json"}).status_code
        == 400
    )
    # queue full: one request runs in the worker, one waits (the limit is 1), the third is refused
    running, running_out = in_background(lambda: infer(url, "__sleep__1.5"))
    wait_for(lambda: status_of(url, "echo")["busy"], "the sleeping batch runs")
    queued, queued_out = in_background(lambda: infer(url, "queued"))
    wait_for(lambda: status_of(url, "echo")["queue_depth"] == 1, "a request waits")
    during = scrape(url, "/api/v1/metrics")
    assert value(during, "modelmora_queue_depth", model="echo", version="1.0.0", priority="normal") == 1
    assert value(during, "modelmora_queue_depth", model="echo", version="1.0.0", priority="high") == 0
    assert value(during, "modelmora_running_batches", model="echo", version="1.0.0") == 1
    r = infer(url, "refused")
    assert r.status_code == 429 and r.headers["traceparent"]
    for t in (running, queued):
        t.join(60)
    assert running_out[0].status_code == 200 and queued_out[0].status_code == 200
    # the deadline passes while the worker sleeps; then a client that gives up (disconnects)
    assert infer(url, "__sleep__0.6", timeout_seconds=0.2).status_code == 504
    wait_for(lambda: not status_of(url, "echo")["busy"], "the worker is idle again")  # the next one runs at once
    with pytest.raises(httpx.ReadTimeout):
        infer(url, "__sleep__0.6", timeout=0.2)
    wait_for(
        lambda: (
            delta(before, scrape(url), "modelmora_request_cancellations_total", model="echo", reason="disconnect") == 1
        ),
        "the disconnect is counted",
    )
    # a second model: the budget holds one worker, so `echo` is evicted for it
    assert infer(url, "other", model="other").status_code == 200
    after = scrape(url)

    def d(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    assert d("modelmora_requests_total", model="echo", outcome="ok", **rest) == 5
    assert d("modelmora_requests_total", model="other", outcome="ok", **rest) == 1
    assert d("modelmora_requests_total", model="echo", outcome="invalid_input", **rest) == 1
    assert d("modelmora_requests_total", model="", task="", protocol="rest", outcome="model_not_found") == 1
    assert d("modelmora_requests_total", model="", task="", protocol="rest", outcome="malformed_request") == 1
    assert d("modelmora_requests_total", model="echo", outcome="queue_full", **rest) == 1
    assert d("modelmora_requests_total", model="echo", outcome="deadline_exceeded", **rest) == 1
    assert d("modelmora_requests_total", model="echo", outcome="client_closed_request", **rest) == 1
    assert d("modelmora_request_duration_seconds_count", model="echo", outcome="ok", **rest) == 5
    assert d("modelmora_request_rejections_total", model="echo", reason="queue_full") == 1
    assert d("modelmora_request_cancellations_total", model="echo", reason="deadline") == 1
    assert d("modelmora_request_cancellations_total", model="echo", reason="disconnect") == 1
    assert d("modelmora_request_cancellations_total", model="echo", reason="client") == 0
    assert d("modelmora_cold_start_requests_total", model="echo") == 1
    assert d("modelmora_cold_start_requests_total", model="other") == 1
    assert d("modelmora_cold_start_wait_seconds_count", model="other") == 1
    assert d("modelmora_cold_start_wait_seconds_sum", model="other") > 0
    # every answered or timed-out request was dispatched (the refused ones never queued)
    assert d("modelmora_queue_wait_seconds_count", model="echo") == 7
    assert d("modelmora_batch_size_items_sum", model="echo") == 9  # 1 + 1 + 3 + 1 + 1 + 1 + 1 items
    assert d("modelmora_inference_duration_seconds_count", model="echo") >= 5  # answered (not cancelled) batches
    assert d("modelmora_inference_duration_seconds_sum", model="echo") >= 0.5  # the worker's own time asleep
    assert d("modelmora_model_loads_total", model="echo", reason="request") == 1
    assert d("modelmora_model_loads_total", model="other", reason="request") == 1
    assert d("modelmora_model_load_duration_seconds_count", model="other") == 1
    assert d("modelmora_model_evictions_total", model="echo", reason="make_room") == 1
    assert d("modelmora_model_unloads_total", model="echo", reason="evict") == 1
    # gauges: `other` alone is loaded, measured, within the budget
    assert value(after, "modelmora_active_models") == 1
    assert value(after, "modelmora_model_state", model="other", version="1.0.0", task="txt2embed", state="ready") == 1
    assert value(after, "modelmora_model_state", model="echo", version="1.0.0", task="txt2embed", state="cached") == 1
    pid = str(status_of(url, "other")["worker"]["pid"])
    pss = value(after, "modelmora_worker_pss_bytes", model="other", version="1.0.0", pid=pid)
    assert pss > MiB
    assert value(after, "modelmora_model_resident_bytes", model="other", version="1.0.0", device="cpu") == pss
    assert value(after, "modelmora_memory_budget_bytes") == 1000 * MiB
    assert 0 < value(after, "modelmora_memory_used_bytes") <= 1000 * MiB
    assert value(after, "process_resident_memory_bytes") > 0
    assert not any(name.startswith("modelmora_gpu_") for name, _ in after)  # no GPU here


def _events(server: ServerProcess) -> list[dict[str, Any]]:
    events = []
    for line in server.log.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not JSON: {line!r}")
    return events


def test_a_traceparent_comes_back_and_tags_the_supervisor_and_worker_lines(server: ServerProcess) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    sent = f"00-{trace_id}-00f067aa0ba902b7-01"
    r = infer(server.url, "traced", headers={"traceparent": sent})
    assert r.status_code == 200
    version, returned_trace, span, flags = r.headers["traceparent"].split("-")
    assert (version, returned_trace, flags) == ("00", trace_id, "01")
    assert len(span) == 16 and span != "00f067aa0ba902b7" and int(span, 16) != 0
    # the server's line for the request and the worker's line for its batch carry the trace id
    wait_for(lambda: any(trace_id in e.get("trace_ids", []) for e in _events(server)), "the worker's line")
    events = _events(server)
    (done,) = [e for e in events if e["event"] == "request_completed" and e.get("trace_id") == trace_id]
    assert done["model"] == "echo" and done["outcome"] == "ok" and done["protocol"] == "rest"
    assert {"total_ms", "queue_ms", "inference_ms"} <= set(done)
    (batch,) = [e for e in events if e["event"] == "batch_done" and trace_id in e.get("trace_ids", [])]
    assert batch["role"] == "worker" and batch["model"] == "echo" and batch["version"] == "1.0.0"
    assert batch["pid"] == status_of(server.url, "echo")["worker"]["pid"] and batch["level"] == "debug"
    for e in events:  # every line, the server's and the workers', has the same three fields
        assert {"timestamp", "level", "event"} <= set(e), e


def test_a_failed_batch_is_an_error_line_in_the_worker_and_the_server_with_the_trace_id(server: ServerProcess) -> None:
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    r = infer(server.url, "__raise__", headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-00"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "inference_failed"
    assert r.headers["traceparent"].startswith(f"00-{trace_id}-") and r.headers["traceparent"].endswith("-00")
    wait_for(lambda: any(e["event"] == "batch_failed" and trace_id in e["trace_ids"] for e in _events(server)), "line")
    events = _events(server)
    (worker,) = [e for e in events if e["event"] == "batch_failed" and trace_id in e["trace_ids"]]
    assert worker["level"] == "error" and worker["role"] == "worker" and worker["error"] == "RuntimeError: boom"
    assert worker["traceback"].startswith("Traceback (most recent call last):")
    (failed,) = [e for e in events if e["event"] == "request_failed" and e.get("trace_id") == trace_id]
    assert failed["level"] == "error" and failed["outcome"] == "inference_failed" and failed["status"] == 500


@pytest.mark.parametrize(
    "header",
    [
        None,
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff is invalid
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper-case hex
        "not a traceparent",
    ],
)
def test_a_missing_or_invalid_traceparent_starts_a_new_trace(server: ServerProcess, header: str | None) -> None:
    r = infer(server.url, "new trace", headers={"traceparent": header} if header else None)
    assert r.status_code == 200
    version, trace_id, span, flags = r.headers["traceparent"].split("-")
    assert version == "00" and flags == "01" and len(trace_id) == 32 and len(span) == 16
    assert int(trace_id, 16) != 0 and int(span, 16) != 0
    assert header is None or trace_id.lower() not in header.lower()
