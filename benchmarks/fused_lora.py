"""Time one decoder layer's four LoRA linears (qkv, o, gate_up, down at the published widths), forward + backward,
with PEFT's forward and with `--fused-lora` (train/fused_lora.py), on the GPU if there is one, else the CPU.

    python benchmarks/fused_lora.py [--tokens 5120] [--rank 64] [--iters 20] [--compile]

Why: the fused path saves one write and one read of each linear's (tokens x out) output per forward pass; whether
that pays depends on the card's memory bandwidth next to its matmul rate, so it is measured, not assumed.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

#: (in_features, out_features) of Phi-3.5-vision's decoder linears: qkv_proj, o_proj, gate_up_proj, down_proj
LINEARS = {"qkv_proj": (3072, 9216), "o_proj": (3072, 3072), "gate_up_proj": (3072, 16384), "down_proj": (8192, 3072)}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        for name, (fan_in, fan_out) in LINEARS.items():
            setattr(self, name, nn.Linear(fan_in, fan_out, bias=False))

    def forward(self, x: torch.Tensor, x_wide: torch.Tensor) -> torch.Tensor:
        out = self.qkv_proj(x).sum() + self.o_proj(x).sum() + self.gate_up_proj(x).sum()
        return out + self.down_proj(x_wide).sum()


def build(rank: int, fused: bool, device: str, dtype: torch.dtype, compiled: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    from phi3v_tune.train.fused_lora import fuse_lora_layers

    torch.manual_seed(0)
    block = Block().to(device, dtype)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LINEARS))
    model = get_peft_model(block, config, autocast_adapter_dtype=False)
    if fused:
        fuse_lora_layers(model)
    return torch.compile(model, dynamic=True) if compiled else model


def time_it(model: nn.Module, tokens: int, iters: int, device: str, dtype: torch.dtype) -> float:
    # the inputs want gradients, as a decoder layer's do in training (the base matmul's input gradient included)
    x = torch.randn(tokens, 3072, device=device, dtype=dtype, requires_grad=True)
    wide = torch.randn(tokens, 8192, device=device, dtype=dtype, requires_grad=True)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        model(x, wide).backward()
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        model(x, wide).backward()
    sync()
    return (time.perf_counter() - t) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=5120, help="tokens per pass (two packed DocVQA documents: 5120)")
    ap.add_argument("--rank", type=int, default=64, help="LoRA rank")
    ap.add_argument("--iters", type=int, default=20, help="timed forward + backward passes")
    ap.add_argument("--compile", action="store_true", help="torch.compile the block (as training compiles layers)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    for fused in (False, True, False, True):  # twice each, interleaved: drift shows as a difference between pairs
        ms = time_it(build(args.rank, fused, device, dtype, args.compile), args.tokens, args.iters, device, dtype)
        print(f"{card} {dtype} tokens={args.tokens} rank={args.rank} compile={args.compile} "
              f"{'fused' if fused else 'peft '}: {ms:.2f} ms per forward+backward of 4 LoRA linears", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
