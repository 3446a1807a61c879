"""The blocking `Client` against `mm serve`: the same results as the async client and REST, its
stream iterator (leaving it early stops the generation), many threads at once, a caller that
has an event loop running (as in Jupyter), and `close()` ending its thread."""

from __future__ import annotations

import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from modelmora.client import Client, ModelState, NotFoundError, StreamRequest, TextResult, Token

from serverproc import ServerProcess

pytestmark = pytest.mark.slow  # a real server process and models

MINILM = "minilm"
TEXTS = ["hello world", "a blocking client", "bonjour"]


def client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "modelmora-client"]


def test_embed_equals_rest_and_close_ends_the_thread(server: ServerProcess, target: str) -> None:
    before = client_threads()
    with Client(target, timeout=120) as client:
        assert len(client_threads()) == len(before) + 1
        got = client.embed(MINILM, TEXTS, normalize=True)
        with pytest.raises(NotFoundError) as missing:
            client.embed("nope", "x")
    assert client_threads() == before
    assert got.dtype == np.float32 and got.shape == (3, 384)
    body = {"input_data": {"text": TEXTS}, "parameters": {"normalize": True}}
    rest = np.array(
        httpx.post(f"{server.url}/api/v1/infer/{MINILM}", json=body, timeout=120).json()["output"]["embeddings"]
    )
    cosine = (got * rest).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(rest, axis=1))
    assert (cosine >= 0.9999).all(), cosine
    assert missing.value.code == "model_not_found"
    client.close()  # again: nothing to do
    with pytest.raises(RuntimeError, match="the client is closed"):
        client.models()


def gpt2(client: Client) -> ModelState:
    return next(m for m in client.status().models if m.model_id == "gpt2")


def test_stream_iterator_and_leaving_it_early(target: str) -> None:
    with Client(target, timeout=180) as client:
        *tokens, last = client.generate_stream("gpt2", "once upon a time", max_tokens=12, temperature=0)
        assert all(isinstance(t, Token) for t in tokens) and isinstance(last, TextResult)
        assert "".join(t.text for t in tokens if isinstance(t, Token)) == last.text
        assert client.generate("gpt2", "once upon a time", max_tokens=12, temperature=0).text == last.text
        before = gpt2(client)
        for event in client.generate_stream("gpt2", "once", max_tokens=120, temperature=0):
            assert isinstance(event, Token)
            break  # the iterator is dropped: the call is cancelled on the server
        deadline = time.monotonic() + 60  # a safety net, not a performance bound
        while not ((m := gpt2(client)).raw.cancelled > before.raw.cancelled and m.queue_depth == 0):
            assert time.monotonic() < deadline, m
            time.sleep(0.05)
        assert m.served == before.served  # stopped, not finished


def test_one_client_serves_many_threads(target: str) -> None:
    with Client(target, timeout=120) as client, ThreadPoolExecutor(4) as pool:
        rows = list(pool.map(lambda i: client.embed(MINILM, f"sentence number {i}"), range(8)))
    assert all(r.shape == (1, 384) for r in rows)
    assert not np.allclose(rows[0], rows[1])


@pytest.mark.anyio
async def test_works_where_an_event_loop_is_running(target: str) -> None:
    """As in a notebook: the caller's thread runs a loop; the client uses its own."""
    with Client(target, timeout=120) as client:
        assert MINILM in [m.id for m in client.models("txt2embed")]  # (and "spare", unless a test deleted it)


def test_a_dropped_client_ends_its_thread(target: str) -> None:
    before = client_threads()
    client = Client(target)
    assert len(client_threads()) == len(before) + 1
    del client
    gc.collect()
    assert client_threads() == before


def test_infer_stream_and_registry_calls(target: str) -> None:
    requests = [StreamRequest.embed(f"r{i}", MINILM, f"sentence {i}") for i in range(20)]
    requests.append(StreamRequest.embed("bad", "nope", "x"))
    with Client(target, timeout=120) as client:
        answers = {a.request_id: a for a in client.infer_stream(requests)}
        single = client.embed(MINILM, "sentence 3")
        settings = client.update_settings(MINILM, max_wait_ms=1.5).settings
        client.update_settings(MINILM)  # back to the defaults
        with pytest.raises(NotFoundError):
            client.delete_model("nope")
    assert len(answers) == 21 and isinstance(answers["bad"].error, NotFoundError)
    assert np.allclose(answers["r3"].value(), single, atol=1e-5)  # type: ignore[arg-type]
    assert settings.max_wait_ms == 1.5
