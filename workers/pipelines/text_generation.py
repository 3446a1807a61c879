"""txt2txt: causal language models (GPT-2, Llama, Qwen, ...) and encoder-decoder models (T5, BART,
...) with a token-by-token decoding loop.

A causal model runs with its KV cache on a left-padded batch of prompts. An encoder-decoder model
encodes the right-padded batch of prompts once, then decodes from its decoder start token (and the
forced first token, BART's `<s>`) with the decoder's KV cache. Either way the loop picks the next
token of every row (greedy at temperature 0, else sampling with temperature and top-p), decodes new text
incrementally, and between steps checks the cancel flag, the stop strings and the end of
sequence. With `stream`, each row's new text is emitted as a "token" event as soon as it is
final: text that may be the start of a stop string is held back until it is not, and a
multi-byte character split across tokens waits for its last token, so the concatenated
events of an item equal its final text exactly.

Seeds: a request with a seed runs its items one at a time, each with its own generator
seeded with that seed, so an item's output does not depend on its batch-mates (another
batch shape or padding may change logits in the last bits, enough to flip a sampled token).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from .. import cancel, events
from ..devices import for_inference, load_kwargs, resolve_device
from .base import InputError, param

if TYPE_CHECKING:
    import torch

__all__ = ("TextGeneration", "texts_input")

_PROMPT_TAIL = 5  # prompt tokens kept as decoding context (a SentencePiece word's leading space)


def texts_input(inputs: dict[str, Any]) -> list[str]:
    """The "text" input, checked: a non-empty list of strings."""
    texts = inputs.get("text")
    if not isinstance(texts, list) or not texts:
        raise InputError("this task needs 'text': a string or a non-empty list of strings", "$.input_data.text")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError("each text must be a string", f"$.input_data.text[{i}]")
    return texts


_WARMUP_PARAMS: dict[str, Any] = {
    "max_tokens": 4,
    "temperature": 0.0,
    "top_p": 1.0,
    "stop": [],
    "seed": None,
    "add_special_tokens": True,
    "stream": False,
    "batch_size": 2,
}


@dataclass
class _Row:
    """One item being generated."""

    index: int  # position in the request's inputs (the event's item)
    prompt: list[int]
    max_new: int  # max_tokens, or less where the model's context ends sooner
    ids: list[int] = field(default_factory=list)  # prompt tail + generated tokens, for decoding
    prefix_offset: int = 0  # ids[prefix_offset:read_offset] is already decoded context
    read_offset: int = 0
    generated: int = 0
    text: str = ""  # final text so far (grows only)
    emitted: int = 0  # len of text already streamed / known to hold no stop string
    reason: str | None = None  # None while generating


class TextGeneration:
    """Generates text from each prompt: a continuation with a causal LM (AutoModelForCausalLM), the
    decoder's output with an encoder-decoder model (AutoModelForSeq2SeqLM); AutoTokenizer for both."""

    def __init__(self, path: str, *, device: str, dtype: str, options: dict[str, Any]) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        self.device = resolve_device(device)
        kwargs = load_kwargs(dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        auto = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        self.model = for_inference(auto.from_pretrained(path, **kwargs), self.device)
        gen = self.model.generation_config
        eos: set[int] = set()
        for value in (gen.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, list):
                eos.update(v for v in value if isinstance(v, int))
        self.eos_ids = frozenset(eos)
        self.pad_id = next(
            (v for v in (self.tokenizer.pad_token_id, gen.pad_token_id, *sorted(eos)) if isinstance(v, int)), 0
        )
        self.start_id = next((v for v in (self.tokenizer.bos_token_id, gen.bos_token_id) if isinstance(v, int)), None)
        if self.start_id is None and eos:
            self.start_id = min(eos)  # GPT-2 style: <|endoftext|> also starts a document
        # encoder-decoder: the decoder starts from this (then the forced first token, if any)
        self.decoder_prefix: list[int] = []
        if self.seq2seq:
            start = next(
                (v for v in (gen.decoder_start_token_id, config.decoder_start_token_id) if isinstance(v, int)),
                self.pad_id,
            )
            forced = gen.forced_bos_token_id
            self.decoder_prefix = [start] + ([forced] if isinstance(forced, int) else [])
        ctx = getattr(self.model.config, "max_position_embeddings", None)
        # the position table: a causal prompt and its new tokens share it; an encoder and a decoder each have one
        self.context = int(ctx) if isinstance(ctx, int) and ctx > 0 else None
        accepted = inspect.signature(self.model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in accepted
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns)
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"

    # -- inputs ---------------------------------------------------------------------------

    def _encode(self, texts: list[str], max_tokens: int, special: bool = True) -> list[_Row]:
        rows = []
        for i, text in enumerate(texts):
            ids = list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
            if not ids:
                if self.start_id is None:
                    raise InputError("the prompt is empty and the model has no start token", f"$.input_data.text[{i}]")
                ids = [self.start_id]
            max_new = max_tokens
            if self.context is not None:
                # a causal prompt needs room for one new token; an encoder may take the whole context
                if len(ids) > self.context - (0 if self.seq2seq else 1):
                    raise InputError(
                        f"the prompt is {len(ids)} tokens; the model's context is {self.context} tokens",
                        f"$.input_data.text[{i}]",
                    )
                room = self.context - len(self.decoder_prefix) if self.seq2seq else self.context - len(ids)
                max_new = min(max_new, room)
            tail = [] if self.seq2seq else ids[-_PROMPT_TAIL:]  # a decoder's text starts from nothing
            rows.append(_Row(i, ids, max_new, ids=list(tail), prefix_offset=0, read_offset=len(tail)))
        return rows

    # -- decoding -------------------------------------------------------------------------

    def _decode_new(self, row: _Row, final: bool) -> str:
        """New text of `row` since the last call, or "" while a character is incomplete."""
        decode = self.tokenizer.decode  # one sequence of ids decodes to one str
        prefix = cast(str, decode(row.ids[row.prefix_offset : row.read_offset], skip_special_tokens=True))
        full = cast(str, decode(row.ids[row.prefix_offset :], skip_special_tokens=True))
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            row.prefix_offset, row.read_offset = row.read_offset, len(row.ids)
            return full[len(prefix) :]
        return ""

    @staticmethod
    def _settle(row: _Row, stops: list[str], stream: bool) -> None:
        """After new text: cut at a stop string, and emit what can no longer change."""
        text = row.text
        cut = min((p for p in (text.find(s, row.emitted) for s in stops) if p >= 0), default=-1)
        if cut >= 0:
            row.text = text = text[:cut]
            row.reason = "stop"
        if row.reason is not None:
            safe = len(text)
        else:  # hold back a suffix that may begin a stop string
            hold = 0
            for s in stops:
                for k in range(min(len(s) - 1, len(text) - row.emitted), hold, -1):
                    if text.endswith(s[:k]):
                        hold = k
                        break
            safe = len(text) - hold
        if safe > row.emitted:
            if stream:
                events.emit("token", {"text": text[row.emitted : safe]}, item=row.index)
            row.emitted = safe

    def _next_tokens(self, logits: torch.Tensor, temperature: float, top_p: float, generator: Any) -> torch.Tensor:
        import torch

        if temperature <= 0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            drop = probs.cumsum(dim=-1) - probs > top_p  # always keeps the most likely token
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)

    def _generate(self, rows: list[_Row], params: dict[str, Any], generator: Any) -> None:
        """Run the decoding loop for a batch of rows, until each has a finish reason."""
        import torch

        temperature = float(param(params, "temperature"))
        top_p = float(param(params, "top_p"))
        stops = [s for s in param(params, "stop") if s]
        stream = bool(param(params, "stream"))
        for row in rows:
            if row.max_new <= 0:
                row.reason = "length"
        if all(row.reason is not None for row in rows):
            return
        inputs = self._first_inputs(rows)
        extra: dict[str, Any] = {"logits_to_keep": 1} if self._logits_to_keep else {}
        with torch.inference_mode():
            for _ in range(max(row.max_new for row in rows)):
                cancel.check()
                out = self.model(**inputs, use_cache=True, **extra)
                extra[self._cache_arg] = out.get(self._cache_arg)
                tokens = self._next_tokens(out.logits[:, -1, :].float(), temperature, top_p, generator)
                for row, token in zip(rows, tokens.tolist(), strict=True):
                    if row.reason is None:
                        self._step(row, int(token), stops, stream)
                if all(row.reason is not None for row in rows):
                    break
                self._advance(inputs, tokens)

    def _first_inputs(self, rows: list[_Row]) -> dict[str, Any]:
        """The model's inputs for the first step: the padded prompts (encoded once for an encoder-decoder)."""
        import torch

        width = max(len(row.prompt) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            # causal: left padding, so that every row's next token comes at the last position
            span = slice(0, len(row.prompt)) if self.seq2seq else slice(width - len(row.prompt), width)
            input_ids[r, span] = torch.tensor(row.prompt, dtype=torch.long)
            mask[r, span] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        if self.seq2seq:
            with torch.inference_mode():
                encoded = self.model.get_encoder()(input_ids=input_ids, attention_mask=mask)
            start = torch.tensor([self.decoder_prefix] * len(rows), dtype=torch.long, device=self.device)
            return {"encoder_outputs": encoded, "attention_mask": mask, "decoder_input_ids": start}
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}

    def _advance(self, inputs: dict[str, Any], tokens: torch.Tensor) -> None:
        """The next step's inputs: only the new tokens (the KV cache holds the rest)."""
        import torch

        if self.seq2seq:
            inputs["decoder_input_ids"] = tokens[:, None]
            return
        mask = inputs["attention_mask"]
        inputs["input_ids"] = tokens[:, None]
        inputs["attention_mask"] = torch.cat([mask, mask.new_ones((len(mask), 1))], dim=-1)
        positions = inputs["position_ids"][:, -1:] + 1
        if self.context is not None:  # rows that ended early keep running: stay inside the table
            positions = positions.clamp(max=self.context - 1)
        inputs["position_ids"] = positions

    def _step(self, row: _Row, token: int, stops: list[str], stream: bool) -> None:
        if token in self.eos_ids:
            row.reason = "stop"
        else:
            row.ids.append(token)
            row.generated += 1
            if row.generated >= row.max_new:
                row.reason = "length"
        row.text += self._decode_new(row, final=row.reason is not None)
        self._settle(row, stops, stream)

    # -- protocol -------------------------------------------------------------------------

    def warmup(self) -> None:
        import torch

        rows = self._encode(["Hello world"], 1)
        with torch.inference_mode():
            logits = self.model(**self._first_inputs(rows)).logits
        if logits.shape[-1] == 0 or not bool(torch.isfinite(logits).all()):
            raise RuntimeError("test inference produced non-finite logits")
        out = self.run({"text": ["Hello", "Hi"]}, _WARMUP_PARAMS)
        if len(out["texts"]) != 2 or any(r not in ("stop", "length") for r in out["finish_reasons"]):
            raise RuntimeError("test inference produced no texts")

    def run(self, inputs: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """Texts and finish reasons, and the tokens of each prompt and completion (int64 arrays)."""
        import numpy as np

        texts = texts_input(inputs)
        max_tokens = int(param(params, "max_tokens"))
        seed = param(params, "seed")
        rows = self._encode(texts, max_tokens, bool(param(params, "add_special_tokens")))
        size = 1 if seed is not None else max(1, int(param(params, "batch_size")))
        for start in range(0, len(rows), size):
            generator = None
            if seed is not None:
                import torch

                generator = torch.Generator(device=self.device).manual_seed(int(seed))
            self._generate(rows[start : start + size], params, generator)
        return {
            "texts": [row.text for row in rows],
            "finish_reasons": [row.reason or "length" for row in rows],
            "prompt_tokens": np.array([len(row.prompt) for row in rows], dtype=np.int64),
            "completion_tokens": np.array([row.generated for row in rows], dtype=np.int64),
        }
