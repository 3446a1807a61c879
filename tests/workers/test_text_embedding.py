"""txt2embed on several inference streams: the pipeline is called from two threads at once."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np

from modelmora_workers.pipelines.text_embedding import TextEmbedding

from .params import worker_params


def test_two_threads_at_once_give_the_results_of_one(minilm_path: Path) -> None:
    """Two inference streams call the same model at once: every batch gets the embeddings it gets alone."""
    pipe = TextEmbedding(str(minilm_path), device="cpu", dtype="auto", options={})
    assert pipe.concurrent
    rng = random.Random(3)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "model", "server", "batch", "stream"]
    batches = [[" ".join(rng.choices(words, k=rng.randint(1, 60))) for _ in range(8)] for _ in range(12)]
    params = worker_params("txt2embed", batch_size=8)
    alone = [pipe.run({"text": b}, params)["embeddings"] for b in batches]
    together: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def stream(k: int) -> None:
        barrier.wait()
        try:
            for i in range(k, len(batches), 2):
                together[i] = pipe.run({"text": batches[i]}, params)["embeddings"]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, expected in enumerate(alone):
        np.testing.assert_allclose(together[i], expected, atol=1e-5)
