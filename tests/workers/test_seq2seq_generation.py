"""txt2txt with encoder-decoder models (tiny T5 and BART), in process: the same decoding loop as the
causal models, checked against transformers' own `generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from modelmora.registry.install import detect_task
from modelmora_workers import cancel, events
from modelmora_workers.pipelines.base import InputError
from modelmora_workers.pipelines.text_generation import TextGeneration

from .test_text_generation import PROMPTS, forward_calls, params, plain
from tiny_models import build_bart, build_t5


@pytest.fixture(scope="module", params=["t5", "bart"])
def seq2seq(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TextGeneration:
    build = build_t5 if request.param == "t5" else build_bart
    path: Path = build(tmp_path_factory.mktemp("models") / request.param)
    pipe = TextGeneration(str(path), device="auto", dtype="auto", options={})
    pipe.warmup()
    return pipe


def reference(pipe: TextGeneration, prompt: str, max_tokens: int) -> str:
    """transformers' greedy `generate` on one prompt, decoded as we decode.

    `generate` counts BART's forced `<s>` as a new token; our `max_tokens` counts text tokens only."""
    enc = pipe.tokenizer(prompt, return_tensors="pt")
    new = max_tokens + len(pipe.decoder_prefix) - 1
    with torch.inference_mode():
        out = pipe.model.generate(**enc, do_sample=False, max_new_tokens=new, num_beams=1)
    text: str = pipe.tokenizer.decode(out[0], skip_special_tokens=True)
    return text


def test_loads_the_encoder_decoder_class(seq2seq: TextGeneration) -> None:
    root = Path(seq2seq.model.name_or_path)
    assert detect_task(sorted(p.name for p in root.iterdir()), root) == "txt2txt"  # what `mm install` registers
    assert seq2seq.seq2seq
    assert seq2seq.model.config.is_encoder_decoder
    kind = seq2seq.model.config.model_type
    assert seq2seq.decoder_prefix == ([0] if kind == "t5" else [2, 0])  # BART: </s> then the forced <s>


def test_greedy_matches_transformers_generate(seq2seq: TextGeneration) -> None:
    with forward_calls(seq2seq) as calls:
        out = seq2seq.run({"text": PROMPTS[:3]}, params(max_tokens=8))
    assert len(calls) <= 8  # one decoder step per new token: the prompt is encoded once
    assert out["texts"] == [reference(seq2seq, p, 8) for p in PROMPTS[:3]]
    assert all(r in ("stop", "length") for r in out["finish_reasons"])


def test_right_padded_batch_equals_each_alone(seq2seq: TextGeneration) -> None:
    batched = seq2seq.run({"text": PROMPTS}, params(max_tokens=6))
    alone = [seq2seq.run({"text": [p]}, params(max_tokens=6))["texts"][0] for p in PROMPTS]
    assert batched["texts"] == alone


def test_seeded_sampling_is_reproducible(seq2seq: TextGeneration) -> None:
    p = params(max_tokens=6, temperature=1.0, seed=11)
    first = seq2seq.run({"text": PROMPTS[:2]}, p)
    assert plain(seq2seq.run({"text": PROMPTS[:2]}, p)) == plain(first)
    assert seq2seq.run({"text": [PROMPTS[1]]}, p)["texts"] == first["texts"][1:]


def test_streaming_deltas_concatenate_to_each_text(seq2seq: TextGeneration) -> None:
    got: dict[int, list[str]] = {}

    def collect(item: int, kind: str, data: dict[str, Any]) -> None:
        assert kind == "token"
        got.setdefault(item, []).append(data["text"])

    with events.sink(collect):
        out = seq2seq.run({"text": PROMPTS[:3]}, params(max_tokens=8, stream=True))
    assert ["".join(got.get(i, [])) for i in range(3)] == out["texts"]


def test_cancel_stops_after_the_current_step(seq2seq: TextGeneration) -> None:
    def cancel_now(*_: Any) -> None:
        cancel.request(21)

    handle = seq2seq.model.register_forward_hook(cancel_now)
    try:
        with forward_calls(seq2seq) as calls, cancel.running(21), pytest.raises(cancel.Cancelled):
            seq2seq.run({"text": PROMPTS[:2]}, params(max_tokens=40))
    finally:
        handle.remove()
    assert len(calls) == 1
    assert seq2seq.run({"text": PROMPTS[:1]}, params(max_tokens=2))["texts"] == [reference(seq2seq, PROMPTS[0], 2)]


def test_bart_context_caps_both_sides(tmp_path: Path) -> None:
    pipe = TextGeneration(str(build_bart(tmp_path / "bart")), device="cpu", dtype="auto", options={})
    assert pipe.context == 64
    # the decoder has 64 positions, two of them taken by </s> <s>
    assert pipe._encode(["Hello"], 500)[0].max_new == 62
    with pytest.raises(InputError) as info:
        pipe.run({"text": ["ok", "word " * 100]}, params())
    assert info.value.field == "$.input_data.text[1]"
    assert "context is 64 tokens" in str(info.value)


def test_prompt_tokens_with_and_without_special_tokens(seq2seq: TextGeneration) -> None:
    """`add_special_tokens=False` (a prompt rendered by a chat template already holds them): the
    tokenizer's end-of-sequence token is not added, and the counts say so."""
    with_special = seq2seq.run({"text": PROMPTS[:2]}, params(max_tokens=3))
    without = seq2seq.run({"text": PROMPTS[:2]}, params(max_tokens=3, add_special_tokens=False))
    tokenizer = seq2seq.tokenizer
    plain_ids = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS[:2]]
    added = len(tokenizer("", add_special_tokens=True)["input_ids"])  # T5: </s>; BART: <s> and </s>
    assert added > 0
    assert without["prompt_tokens"].tolist() == plain_ids
    assert with_special["prompt_tokens"].tolist() == [n + added for n in plain_ids]
