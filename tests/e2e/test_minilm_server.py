"""End to end with the real all-MiniLM-L6-v2: `mm install`, `mm serve`, REST, a real worker."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from modelmora.ipc import segments

from serverproc import ServerProcess, mm

pytestmark = pytest.mark.slow  # real server processes

MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("minilm-home")
    mm("install", str(minilm_path), "--id", MODEL, "--task", "txt2embed", home=home)
    srv = ServerProcess(home, {"MODELMORA_TORCH_THREADS": "2"}).start()
    try:
        yield srv
    finally:
        assert srv.stop() == 0
        # the supervisor unlinked every segment it created, also the SIGKILLed worker's
        assert [n for n in segments.our_segments() if n.startswith(f"mm-{srv.pid}-")] == []


@pytest.fixture(scope="module")
def reference(minilm_path: Path):  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path), device="cpu")


COLD_START_S = 300
"""The request deadline: the first request waits for the model's load, which a busy machine can
stretch past the server's 30 s default (a safety net, not a performance bound)."""


def embed(server: ServerProcess, text: object, **extra: object) -> httpx.Response:
    body = {"input_data": {"text": text}, "timeout_seconds": COLD_START_S, **extra}
    return httpx.post(f"{server.url}/api/v1/infer/{MODEL}", json=body, timeout=COLD_START_S + 30)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_one_text_matches_in_process_encode(server: ServerProcess, reference) -> None:  # type: ignore[no-untyped-def]
    r = embed(server, "The quick brown fox jumps over the lazy dog.")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_id"] == MODEL and body["output"]["dim"] == 384
    got = np.asarray(body["output"]["embeddings"], dtype=np.float32)
    want = reference.encode(["The quick brown fox jumps over the lazy dog."])
    assert got.shape == (1, 384)
    assert cosine_rows(got, want).min() >= 0.9999


def test_fifty_texts_match_in_process_encode(server: ServerProcess, reference) -> None:  # type: ignore[no-untyped-def]
    texts = [f"Sentence number {i} talks about {'cats' if i % 2 else 'the weather'} in {i} ways." for i in range(50)]
    r = embed(server, texts)
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["output"]["embeddings"], dtype=np.float32)
    want = reference.encode(texts)
    assert got.shape == (50, 384)
    assert cosine_rows(got, want).min() >= 0.9999


def test_supervisor_never_imports_torch(server: ServerProcess) -> None:
    assert embed(server, "hello").status_code == 200
    status = httpx.get(f"{server.url}/api/v1/status").json()
    assert status["supervisor"]["pid"] == server.pid
    assert status["supervisor"]["torch_imported"] is False
    (model,) = status["models"]
    assert model["worker"]["pid"] not in (server.pid, os.getpid())
    # the production path: the worker is a fork of the zygote, which imported torch for it
    assert model["worker"]["forked"] is True and status["zygote"]["state"] == "ready"


def test_http2_cleartext_same_port(server: ServerProcess) -> None:
    with httpx.Client(http1=False, http2=True) as client:
        r = client.post(f"{server.url}/api/v1/infer/{MODEL}", json={"input_data": {"text": "h2c"}})
    assert r.status_code == 200 and r.http_version == "HTTP/2"
    assert httpx.get(f"{server.url}/health/live").http_version == "HTTP/1.1"


def test_kill_worker_mid_request(server: ServerProcess) -> None:
    assert embed(server, "warm").status_code == 200
    pid = httpx.get(f"{server.url}/api/v1/status").json()["models"][0]["worker"]["pid"]
    result: dict[str, httpx.Response] = {}

    def long_request() -> None:
        result["r"] = embed(server, [f"a rather long sentence number {i} " * 8 for i in range(2000)])

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the batch is in the worker
        models = httpx.get(f"{server.url}/api/v1/status").json()["models"]
        if models[0].get("worker", {}).get("in_flight_batches"):
            break
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    t.join(60)
    r = result["r"]
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "worker_crashed" and MODEL in err["message"]
    assert "Retry-After" in r.headers
    # the next request starts a fresh worker and succeeds
    r2 = embed(server, "after the crash")
    assert r2.status_code == 200
    model = httpx.get(f"{server.url}/api/v1/status").json()["models"][0]
    assert model["worker"]["pid"] != pid and model["crashes"] == 1
    # the dead worker's segment is gone: exactly one worker segment of this server remains
    ours = [n for n in segments.our_segments() if n.startswith(f"mm-{server.pid}-") and "-w-" in n]
    assert len(ours) == 1


def test_trio_server_serves_the_same_embeddings(
    server: ServerProcess,
    reference,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    minilm_path: Path,
) -> None:
    """One real model on each backend: `mm serve --backend trio` (zygote on) serves the embedding the
    asyncio server (the module's `server`) serves and sentence-transformers computes in process."""
    texts = ["The quick brown fox jumps over the lazy dog.", "Trio runs this server."]
    home = tmp_path / "trio-home"
    mm("install", str(minilm_path), "--id", MODEL, "--task", "txt2embed", home=home)
    env = {"MODELMORA_TORCH_THREADS": "2", "MODELMORA_LOG_FORMAT": "json"}
    srv = ServerProcess(home, env, args=("--backend", "trio")).start()
    try:
        r = embed(srv, texts)
        assert r.status_code == 200, r.text
        status = httpx.get(f"{srv.url}/api/v1/status").json()
        assert status["models"][0]["worker"]["forked"] is True
    finally:
        assert srv.stop() == 0
    listening = [json.loads(line) for line in srv.log.read_text().splitlines() if '"listening"' in line]
    assert listening and listening[0]["backend"] == "trio"
    got = np.asarray(r.json()["output"]["embeddings"], dtype=np.float32)
    on_asyncio = embed(server, texts)
    assert on_asyncio.status_code == 200, on_asyncio.text
    want = np.asarray(on_asyncio.json()["output"]["embeddings"], dtype=np.float32)
    assert got.shape == want.shape == (2, 384)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert cosine_rows(got, reference.encode(texts)).min() >= 0.9999
