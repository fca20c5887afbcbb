"""What a training run's settings mean on this machine, resolved once before the model loads.

`TrainConfig` says what the user asked for (`--bf16`, `--master-weights auto`, `--compile` unset...); `Runtime` says
what the run does with it here: the device, the precision, the master weights, whether layers are compiled, whether
batches are packed, which attention kernels run, whether the decoder's linear layers multiply in float8. Everything
below `train/run.py` receives these plain values, so no component re-derives them from the config (and no two
components can disagree).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..config import TrainConfig, fsdp_on, zero_stage
from ..model.packed_attention import ATTN_NAME as PACKED_ATTENTION
from .fp8 import check_fp8_support


@dataclass(frozen=True)
class Runtime:
    """The resolved run: device, precision and the engines' choices (see `Runtime.resolve`)."""

    on_cuda: bool  # a CUDA GPU trains (one is present and --cpu was not asked for)
    bf16: bool  # bf16 compute (autocast with fp32 master weights, or all-bf16 weights with bf16-sr)
    fp16: bool  # fp16 autocast with loss scaling
    master_weights: str  # "fp32" or "bf16-sr"
    compile: bool  # regional torch.compile of the decoder and CLIP layers
    packing: bool  # several samples per forward pass concatenated into one row
    attn_implementation: str  # what the model is loaded with: sdpa, eager or the packed-rows kernel
    fsdp: bool  # FSDP2, from --fsdp or an accelerate FSDP launch
    zero_stage: int | None  # the DeepSpeed ZeRO stage, None without DeepSpeed
    world_size: int  # processes training together
    fp8: str | None  # --fp8's scaling (tensorwise / rowwise) where the decoder's linear layers multiply in float8

    @classmethod
    def resolve(cls, cfg: TrainConfig, world_size: int | None = None) -> Runtime:
        """The one place where settings meet the machine (CUDA, bf16 support, launcher environment)."""
        on_cuda = not cfg.cpu and torch.cuda.is_available()
        fsdp = fsdp_on(cfg.fsdp)
        if cfg.fp16:
            bf16, fp16 = False, True
        elif cfg.bf16 or cfg.master_weights == "bf16-sr":
            bf16, fp16 = True, False
        else:  # bf16 by default on GPUs that support it; fp32 on the CPU unless asked
            bf16, fp16 = on_cuda and torch.cuda.is_bf16_supported(), False
        if cfg.master_weights != "auto":
            master = cfg.master_weights
        else:  # bf16-sr on a CUDA GPU in bf16 without an engine that brings its own master weights; CPU runs stay fp32
            master = "bf16-sr" if on_cuda and bf16 and not cfg.deepspeed and not fsdp else "fp32"
        if cfg.compile is not None:
            compiled = cfg.compile
        elif not on_cuda or cfg.deepspeed or fsdp:  # the engines wrap parameters in ways not measured with compile
            compiled = False
        else:  # qlora pays for compile only with activation checkpointing (benchmarks/RESULTS.md)
            compiled = cfg.method != "qlora" or cfg.gradient_checkpointing
        # one sample per pass: nothing to pack; a preference pair is two sequences (chosen, rejected) that pack
        packing = cfg.packing and (cfg.batch_size_per_device > 1 or cfg.objective == "dpo")
        attention = PACKED_ATTENTION if packing and cfg.attn_implementation == "sdpa" else cfg.attn_implementation
        world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
        fp8 = cfg.fp8_scaling if cfg.fp8 else None
        if fp8:
            check_fp8_support(on_cuda)  # the CPU, an older GPU or no torchao: refused before the model loads
        return cls(
            on_cuda=on_cuda,
            bf16=bf16,
            fp16=fp16,
            master_weights=master,
            compile=compiled,
            packing=packing,
            attn_implementation=attention,
            fsdp=fsdp,
            zero_stage=zero_stage(cfg.deepspeed),
            world_size=world,
            fp8=fp8,
        )

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the math runs in (and a bf16/fp16 final model is saved in)."""
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32

    @property
    def autocast_bf16(self) -> bool:
        """The Trainer's bf16 autocast: on for bf16 with fp32 master weights; all-bf16 weights need none."""
        return self.bf16 and self.master_weights != "bf16-sr"

    def weights_dtype(self, method: str) -> torch.dtype:
        """The dtype the model loads in: frozen LoRA bases in the compute dtype (PEFT keeps adapters in fp32 unless
        bf16-sr), bf16 weights for bf16-sr, else fp32 master weights under autocast."""
        if method in ("lora", "qlora"):
            return self.compute_dtype
        return torch.bfloat16 if self.master_weights == "bf16-sr" else torch.float32
