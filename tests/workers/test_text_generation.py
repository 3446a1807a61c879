"""txt2txt on a tiny GPT-2, in process: batching, seeds, stop strings, streaming, cancel."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from modelmora_workers import cancel, events
from modelmora_workers.pipelines.base import InputError
from modelmora_workers.pipelines.text_generation import TextGeneration, _Row

from .params import worker_params

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy", "A", "Once upon a time there was", "Hi!"]


def params(**overrides: Any) -> dict[str, Any]:
    return worker_params("txt2txt", **{"max_tokens": 12, "temperature": 0.0, **overrides})


def plain(out: dict[str, Any]) -> dict[str, Any]:
    """A pipeline's outputs with the token-count arrays as lists (comparable with ==)."""
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in out.items()}


@contextmanager
def forward_calls(pipe: TextGeneration) -> Iterator[list[int]]:
    """Counts the model's forward passes (one per generated token) while the block runs."""
    calls: list[int] = []
    handle = pipe.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def byte_level_ids(pipe: TextGeneration, data: bytes) -> list[int]:
    """One token per byte, through GPT-2's byte-to-unicode alphabet."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in table)})
    ids = pipe.tokenizer.convert_tokens_to_ids([table[b] for b in data])
    assert pipe.tokenizer.unk_token_id not in ids or pipe.tokenizer.unk_token_id in pipe.eos_ids
    return list(ids)


def test_one_text_and_reason_per_prompt(txt2txt: TextGeneration) -> None:
    with forward_calls(txt2txt) as calls:
        out = txt2txt.run({"text": PROMPTS[:3]}, params(max_tokens=7))
    assert set(out) == {"texts", "finish_reasons", "prompt_tokens", "completion_tokens"}
    assert len(out["texts"]) == len(out["finish_reasons"]) == 3
    assert out["completion_tokens"].tolist() == [7, 7, 7]
    prompts = [len(txt2txt.tokenizer(p)["input_ids"]) for p in PROMPTS[:3]]
    assert out["prompt_tokens"].tolist() == prompts
    assert all(isinstance(t, str) for t in out["texts"])
    assert out["finish_reasons"] == ["length"] * 3  # a random model does not pick <|endoftext|> greedily here
    assert len(calls) == 7  # one batched forward pass per new token: 7 tokens, prompt not counted
    assert all(out["texts"])
    assert not out["texts"][1].startswith(PROMPTS[1])  # the continuation only


def test_greedy_left_padded_batch_equals_each_alone(txt2txt: TextGeneration) -> None:
    batched = txt2txt.run({"text": PROMPTS}, params(max_tokens=10))
    alone = [txt2txt.run({"text": [p]}, params(max_tokens=10)) for p in PROMPTS]
    assert batched["texts"] == [a["texts"][0] for a in alone]
    assert batched["finish_reasons"] == [a["finish_reasons"][0] for a in alone]


def test_small_batch_size_keeps_all_items_in_order(txt2txt: TextGeneration) -> None:
    full = txt2txt.run({"text": PROMPTS}, params(batch_size=8))
    with forward_calls(txt2txt) as calls:
        split = txt2txt.run({"text": PROMPTS}, params(batch_size=2))
    assert plain(split) == plain(full)
    assert len(calls) == 3 * 12  # three passes of at most two prompts


def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates(txt2txt: TextGeneration) -> None:
    p = params(temperature=1.0, top_p=0.9, seed=42, max_tokens=16)
    alone = txt2txt.run({"text": [PROMPTS[1]]}, p)
    again = txt2txt.run({"text": [PROMPTS[1]]}, p)
    in_batch = txt2txt.run({"text": [PROMPTS[0], PROMPTS[1], PROMPTS[3]]}, p)
    assert alone == again
    assert in_batch["texts"][1] == alone["texts"][0]
    assert in_batch["finish_reasons"][1] == alone["finish_reasons"][0]
    other_seeds = {txt2txt.run({"text": [PROMPTS[1]]}, {**p, "seed": s})["texts"][0] for s in range(4)}
    assert len(other_seeds) > 1  # the seed does drive the sampling


def test_eos_finishes_with_stop_and_is_not_in_the_text(
    txt2txt: TextGeneration, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(txt2txt, "eos_ids", frozenset(range(len(txt2txt.tokenizer))))  # every token ends
    out = txt2txt.run({"text": PROMPTS[:2]}, params())
    assert plain(out) == {
        "texts": ["", ""],
        "finish_reasons": ["stop", "stop"],
        "prompt_tokens": [len(txt2txt.tokenizer(p)["input_ids"]) for p in PROMPTS[:2]],
        "completion_tokens": [0, 0],
    }


def _stop_string(text: str) -> str:
    """Two characters from the middle of a generated text (no replacement characters)."""
    pos = next(i for i in range(4, len(text) - 1) if "\ufffd" not in text[i : i + 2])
    return text[pos : pos + 2]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text_and_is_excluded(txt2txt: TextGeneration, stream: bool) -> None:
    p = params(temperature=0.8, seed=7, max_tokens=40, stream=stream)
    full = txt2txt.run({"text": [PROMPTS[3]]}, p)["texts"][0]
    stop = _stop_string(full)
    received: list[str] = []
    with events.sink(lambda item, kind, data: received.append(data["text"])):
        out = txt2txt.run({"text": [PROMPTS[3]]}, {**p, "stop": ["never there", stop]})
    assert out["texts"] == [full[: full.find(stop)]]
    assert out["finish_reasons"] == ["stop"]
    if stream:
        assert "".join(received) == out["texts"][0]
        assert all(stop not in chunk for chunk in received)
    else:
        assert received == []


def test_streaming_deltas_concatenate_to_each_text_and_arrive_early(txt2txt: TextGeneration) -> None:
    p = params(temperature=1.0, seed=3, max_tokens=20, stream=True, stop=["zz"])
    received: list[tuple[int, str, str, int]] = []
    with forward_calls(txt2txt) as calls:

        def sink(item: int, kind: str, data: dict[str, Any]) -> None:
            received.append((item, kind, data["text"], len(calls)))

        with events.sink(sink):
            out = txt2txt.run({"text": PROMPTS[:3]}, p)
        total = len(calls)
    assert {kind for _, kind, _, _ in received} == {"token"}
    for i, text in enumerate(out["texts"]):
        deltas = [delta for item, _, delta, _ in received if item == i]
        assert deltas, f"no token event for item {i}"
        assert all(deltas)
        assert "".join(deltas) == text
    assert received[0][3] < total / 2  # the first delta came while generating, not at the end
    assert plain(out) == plain(txt2txt.run({"text": PROMPTS[:3]}, {**p, "stream": False}))


def test_streaming_holds_back_split_multibyte_characters(txt2txt: TextGeneration) -> None:
    ids = byte_level_ids(txt2txt, "é😀!".encode())
    row = _Row(0, prompt=[0], max_new=10, ids=[0], prefix_offset=0, read_offset=1)
    received: list[str] = []
    with events.sink(lambda item, kind, data: received.append(data["text"])):
        for token in ids:
            txt2txt._step(row, token, [], True)
    assert received == ["é", "😀", "!"]
    assert row.text == "é😀!"


def test_streaming_holds_back_a_possible_stop_prefix(txt2txt: TextGeneration) -> None:
    ids = byte_level_ids(txt2txt, b"ab<e>cd<end>ef")
    row = _Row(4, prompt=[0], max_new=20, ids=[0], prefix_offset=0, read_offset=1)
    received: list[str] = []
    with events.sink(lambda item, kind, data: received.append(data["text"])):
        for token in ids:
            txt2txt._step(row, token, ["<end>"], True)
            if row.reason is not None:
                break
    assert row.text == "ab<e>cd"
    assert row.reason == "stop"
    assert received == ["a", "b", "<e>", "c", "d"]  # "<" and "<e" waited until ">" showed no stop string


def test_max_tokens_is_capped_by_the_context(txt2txt: TextGeneration) -> None:
    prompt = "x" * 100
    n = len(txt2txt.tokenizer(prompt)["input_ids"])
    assert 50 < n < 128
    with forward_calls(txt2txt) as calls:
        out = txt2txt.run({"text": [prompt]}, params(max_tokens=500))
    assert out["finish_reasons"] == ["length"]
    assert len(calls) == 128 - n


def test_rows_end_at_their_own_context_limit_in_a_batch(txt2txt: TextGeneration) -> None:
    long = "x" * 100
    n = len(txt2txt.tokenizer(long)["input_ids"])
    out = txt2txt.run({"text": [long, "Hi"]}, params(max_tokens=128 - n + 20, temperature=1.0))
    alone = txt2txt.run({"text": [long]}, params(max_tokens=500))
    assert out["finish_reasons"][0] == "length"
    assert len(out["texts"][1]) > 0
    assert alone["finish_reasons"] == ["length"]


def test_cancel_before_and_during_generation(txt2txt: TextGeneration) -> None:
    with cancel.running(7), pytest.raises(cancel.Cancelled):
        cancel.request(7)
        txt2txt.run({"text": PROMPTS[:2]}, params())

    received: list[str] = []

    def cancel_on_first_token(item: int, kind: str, data: dict[str, Any]) -> None:
        received.append(data["text"])
        cancel.request(8)

    with cancel.running(8), events.sink(cancel_on_first_token), pytest.raises(cancel.Cancelled):
        txt2txt.run({"text": PROMPTS[:1]}, params(max_tokens=50, stream=True))
    assert len(received) == 1
    assert not cancel.is_cancelled()
    assert txt2txt.run({"text": PROMPTS[:1]}, params(max_tokens=2))["finish_reasons"] == ["length"]


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({}, "$.input_data.text"),
        ({"text": []}, "$.input_data.text"),
        ({"text": "not a list"}, "$.input_data.text"),
        ({"text": ["ok", 3]}, "$.input_data.text[1]"),
        ({"text": ["ok", "fine", "word " * 200]}, "$.input_data.text[2]"),
    ],
)
def test_bad_prompts_are_input_errors(txt2txt: TextGeneration, inputs: dict[str, Any], field: str) -> None:
    with pytest.raises(InputError) as info:
        txt2txt.run(inputs, params())
    assert info.value.field == field


def test_empty_prompt_starts_from_the_start_token(txt2txt: TextGeneration) -> None:
    out = txt2txt.run({"text": [""]}, params(max_tokens=3))
    assert len(out["texts"]) == 1
    assert out["finish_reasons"][0] in ("stop", "length")
