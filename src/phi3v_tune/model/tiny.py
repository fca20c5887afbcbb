"""Tiny Phi-3-vision models for tests, the demo and smoke runs: same architecture and code path, small enough for a CPU.

Everything is generated locally (no download): a small BPE tokenizer trained on the fly with the real tokenizer's
special tokens and normalisation, a small config (LM hidden 64, CLIP hidden 32, 336-px crops so the HD layout is the
real one), and random weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import GenerationConfig, PreTrainedTokenizerFast

from ..processing.geometry import CROP_SIZE, MAX_NUM_CROPS, TOKENS_PER_CROP
from ..processing.processor import Phi3VProcessor
from ..processing.tokenizer import CHAT_TEMPLATE
from .configuration import Phi3VConfig
from .modeling import Phi3VForCausalLM

# id order mirrors the real tokenizer's first ids (<unk>=0, <s>=1, </s>=2); the chat tokens follow.
_SPECIALS = [
    ("<unk>", False),
    ("<s>", False),
    ("</s>", True),
    ("<|endoftext|>", False),
    ("<|assistant|>", True),
    ("<|system|>", False),
    ("<|end|>", False),
    ("<|user|>", False),
    ("<|image|>", True),
]

_BASE_CORPUS = """
What is shown in the image? Describe the picture. Answer with one word. Which one is larger? Is it left or right?
The quick brown fox jumps over the lazy dog. Classify the video into one of the following classes.
Compare the two images. Yes no true false. red green blue yellow white black circle square triangle.
What colour is the shape? What shape is it? In which direction does the object move? up down left right.
What shape is shown? Which image shows the bigger shape? Answer first or second. In which direction does the dot move?
red green blue yellow circle square triangle first second left right up down red green blue yellow circle square
triangle first second left right up down the a an is of in on and or to with image images picture photo video
Document question answering: what is the date, the total, the name? 0 1 2 3 4 5 6 7 8 9 , . ? ! : ; - ' "
"""


TINY = "tiny"  # `--model tiny` (or `tiny:N`, N decoder layers): a tiny random model written on the fly


def tiny_layers(model: str | None) -> int | None:
    """For a `--model` value: None when it names no tiny model, 0 for `tiny` (the default size), N for `tiny:N`."""
    if model == TINY:
        return 0
    if model and model.startswith(TINY + ":"):
        count = model[len(TINY) + 1 :]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--model {model}: expected 'tiny' or 'tiny:N' with N >= 1 decoder layers")
        return int(count)
    return None


def build_tiny_tokenizer(extra_text: Iterable[str] = (), vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A BPE tokenizer with the Phi-3 special tokens, the published normaliser and chat template."""
    tok = Tokenizer(BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # split at "▁" (kept at the start of each word) so frequent words become single tokens
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    alphabet = [chr(c) for c in range(32, 127)] + ["▁", "\n"]
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[name for name, _ in _SPECIALS],
        initial_alphabet=alphabet,
        min_frequency=1,
        show_progress=False,
    )
    corpus = [_BASE_CORPUS, *extra_text]
    tok.train_from_iterator([line for text in corpus for line in text.splitlines() if line.strip()], trainer)
    tok.add_special_tokens(
        [AddedToken(name, rstrip=rstrip, lstrip=False, normalized=False, special=True) for name, rstrip in _SPECIALS]
    )
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


#: `tiny_config` overrides for the published depth (32 decoder layers, CLIP with 24 layers) at tiny widths: the
#: module and parameter-tensor count of the real model, for measuring per-module host work on a CPU (benchmarks/)
PUBLISHED_DEPTH = dict(
    num_hidden_layers=32,
    vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 24, "num_attention_heads": 4,
                   "image_size": CROP_SIZE, "patch_size": 14, "projection_dim": 32},
)  # fmt: skip


def tiny_config(tokenizer: PreTrainedTokenizerFast, **overrides) -> Phi3VConfig:
    """A small config with the published structure (su-RoPE, HD transform, 336-px CLIP crops)."""
    head_dim = 16
    half = head_dim // 2
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_theta=10000.0,
        rope_scaling={
            "type": "su",
            "short_factor": [1.0 + 0.05 * i for i in range(half)],
            "long_factor": [1.5 + 0.5 * i for i in range(half)],
        },
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("</s>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        img_processor={"image_dim_out": 32, "num_img_tokens": TOKENS_PER_CROP},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": CROP_SIZE,
            "patch_size": 14,
            "projection_dim": 32,
        },
    )
    if "hidden_size" in overrides and "num_attention_heads" not in overrides:  # keep head_dim 16 (8 rope factors)
        overrides = {**overrides, "num_attention_heads": overrides["hidden_size"] // head_dim}
        overrides.setdefault("num_key_value_heads", overrides["num_attention_heads"])
    settings.update(overrides)
    return Phi3VConfig.from_dict(settings)


def tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides) -> Phi3VForCausalLM:
    """Random-weight tiny model (float32), reproducible from `seed`."""
    torch.manual_seed(seed)
    model = Phi3VForCausalLM(tiny_config(tokenizer, **overrides))
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        do_sample=False,
    )
    return model.eval()


def save_tiny_checkpoint(
    folder: str | Path, seed: int = 0, num_crops: int = MAX_NUM_CROPS, extra_text: Iterable[str] = (), **overrides
) -> Path:
    """Write a complete model folder (config, safetensors, tokenizer, preprocessor) like a published one."""
    folder = Path(folder)
    tokenizer = build_tiny_tokenizer(extra_text)
    model = tiny_model(tokenizer, seed=seed, **overrides)
    model.save_pretrained(folder)
    Phi3VProcessor.from_tokenizer(tokenizer, num_crops=num_crops).save_pretrained(folder)
    return folder
