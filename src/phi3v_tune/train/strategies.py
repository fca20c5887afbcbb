"""The four training strategies of the original recipe: full, freeze-vision, LoRA and QLoRA.

* full: everything trains (except the CLIP tail that is stored but never computed).
* freeze-vision: the CLIP tower is frozen; projector, separators, word embeddings and the LM train. (The recipe
  also froze the shared word embeddings by accident; we do not.) `--freeze-projector` freezes the projector too.
* lora: PEFT LoRA on the LM's `qkv_proj, o_proj, gate_up_proj, down_proj` (+ `lm_head`, as the recipe), and with
  `--lora-vision` on CLIP's `q/k/v/out_proj, fc1, fc2` and the projector; rank 64, alpha 128, dropout 0, gaussian
  init by default. Only the adapters train.
* qlora: the LM's linear layers in 4-bit NF4 (bitsandbytes, GPU only) + the same LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import BitsAndBytesConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from ..config import METHODS
from ..model.modeling import Phi3VForCausalLM

LM_LORA = r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))"
VISION_PREFIX = r"model\.vision_embed_tokens"


PARTS = ("language", "vision", "projector")


def parameter_part(name: str) -> str:
    """Which part of the model a parameter (or a LoRA adapter on it) belongs to, by its name: vision (the CLIP
    tower), projector (the image projection and the separators glb_GN / sub_GN) or language (everything else: the
    decoder, embeddings, lm_head). Wrapper prefixes (PEFT's base_model.model.) do not matter."""
    if "vision_embed_tokens.img_processor." in name:
        return "vision"
    if any(f"vision_embed_tokens.{part}" in name for part in ("img_projection", "glb_GN", "sub_GN")):
        return "projector"
    return "language"


def lora_target_regex(model: Phi3VForCausalLM, lm_head: bool, vision: bool) -> str:
    parts = [LM_LORA]
    if lm_head:
        parts.append(r"lm_head")
    if vision:
        used = model.model.vision_embed_tokens.num_layers_used
        layers = "|".join(str(i) for i in range(used))  # never the stored-but-unused tail
        parts.append(
            rf"{VISION_PREFIX}\.img_processor\.vision_model\.encoder\.layers\.({layers})\."
            r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"
        )
        parts.append(rf"{VISION_PREFIX}\.img_projection\.(0|2)")
    return "^(" + "|".join(parts) + ")$"


@dataclass
class ParamCount:
    trainable: int
    total: int

    def __str__(self) -> str:
        return (
            f"trainable parameters: {self.trainable:,} of {self.total:,} "
            f"({100 * self.trainable / max(1, self.total):.2f}%)"
        )


def count_parameters(model: nn.Module) -> ParamCount:
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state"):  # bnb 4-bit packs two values per byte
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return ParamCount(trainable, total)


@dataclass(frozen=True)
class LoraSettings:
    """The adapters of lora/qlora (the recipe's defaults: rank 64, alpha 2 x rank, no dropout, lm_head too)."""

    rank: int = 64
    alpha: int = 128
    dropout: float = 0.0
    lm_head: bool = True
    vision: bool = False  # also CLIP's attention and MLP projections and the image projector
    variant: str = "lora"  # lora | dora (PEFT use_dora) | rslora (PEFT use_rslora)


def qlora_quantization_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """bitsandbytes NF4 for the LM linears; the vision tower, projector and lm_head stay in higher precision."""
    if not torch.cuda.is_available():
        raise RuntimeError("--method qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); use lora on CPU")
    compute = torch.float16 if compute_dtype == torch.float16 else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=False,
        llm_int8_skip_modules=["model.vision_embed_tokens", "lm_head"],
    )


def apply_strategy(
    model: Phi3VForCausalLM,
    method: str,
    *,
    freeze_projector: bool = False,
    lora: LoraSettings | None = None,
    bf16_adapters: bool = False,
) -> nn.Module:
    """Set what trains for `method`; returns the model to train (a PEFT model for lora/qlora).

    `lora`: the adapters' settings (lora/qlora; default `LoraSettings()`). `bf16_adapters`: bf16 adapters trained
    without autocast (bf16-sr master weights) instead of PEFT's fp32 adapters (and, for qlora, PEFT's k-bit
    preparation)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    vision = model.model.vision_embed_tokens
    if method in ("full", "freeze-vision"):
        model.requires_grad_(True)
        if method == "freeze-vision":
            vision.img_processor.requires_grad_(False)
            if freeze_projector:
                vision.img_projection.requires_grad_(False)
                vision.glb_GN.requires_grad_(False)
                vision.sub_GN.requires_grad_(False)
        model.freeze_unused()
        return model

    from peft import LoraConfig, get_peft_model

    lora = lora or LoraSettings()
    bf16_sr = bf16_adapters
    if method == "qlora" and not bf16_sr:
        from peft import prepare_model_for_kbit_training

        # fp32 norms, embeddings and vision tower under autocast (PEFT's recipe); bf16-sr keeps them bf16. The
        # checkpointed layers are chosen later by checkpoint_only (PEFT's switch would wrap the frozen CLIP layers)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.requires_grad_(False)
    lora = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_regex(model, lora.lm_head, lora.vision),
        init_lora_weights="gaussian",
        use_dora=lora.variant == "dora",
        use_rslora=lora.variant == "rslora",
        bias="none",
        task_type="CAUSAL_LM",
    )
    # bf16-sr: adapters in the base weights' dtype (bf16), trained without autocast by the stochastic-rounding AdamW
    peft_model = get_peft_model(model, lora, autocast_adapter_dtype=not bf16_sr)
    if bf16_sr:  # PEFT leaves adapters on 4-bit layers in fp32 (their base weight has no float dtype)
        for param in peft_model.parameters():
            if param.requires_grad and param.dtype == torch.float32:
                param.data = param.data.to(torch.bfloat16)
    model.freeze_unused()
    return peft_model


def checkpoint_only(model: nn.Module, scope: str, decoder_layers: int | None = None) -> int:
    """Selective activation checkpointing: non-reentrant checkpointing on the CLIP encoder layers ('vision'; only
    those with a trainable weight), the decoder layers ('language') or both ('all'), and of the decoder layers only
    the first `decoder_layers` when given; returns how many layers recompute. Every `--gradient-checkpointing` run
    comes here rather than to the Trainer's switch, which would wrap every CLIP layer, frozen ones included."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    chosen = decoder_seen = 0
    for module in base.modules():
        if isinstance(module, GradientCheckpointingLayer):
            if isinstance(module, CLIPEncoderLayer):
                # a frozen CLIP layer is never recorded for autograd: there is nothing to recompute, and the
                # checkpoint wrapper would only add host time per layer
                trains = any(p.requires_grad for p in module.parameters())
                keep = scope in ("all", "vision") and trains
            else:
                keep = scope in ("all", "language") and (decoder_layers is None or decoder_seen < decoder_layers)
                decoder_seen += 1
            module.gradient_checkpointing = keep
            chosen += int(keep)
    return chosen
