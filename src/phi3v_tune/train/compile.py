"""Regional `torch.compile`: each decoder layer and CLIP encoder layer compiled on its own.

Why regional: the layers are identical, so one compilation serves all 32 (and all 23 CLIP layers) and compile time
stays around a minute; the model around them (image scatter, loss, PEFT wrappers) stays eager and flexible. Inductor
fuses the elementwise work between the matmuls (RMSNorm, RoPE, SiLU-gate, residual adds, LoRA scaling) and cuts
kernel launches, which matters at batch 1. Sequence lengths vary from batch to batch, so the layers are compiled
with dynamic shapes from the start (one compilation instead of one per new length).
"""

from __future__ import annotations

from torch import nn

LAYER_CLASSES = ("Phi3DecoderLayer", "CLIPEncoderLayer")


def compile_layers(model: nn.Module, backend: str = "inductor") -> int:
    """Compile every decoder / CLIP encoder layer of `model` in place; returns how many were compiled."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in LAYER_CLASSES:
            module.compile(backend=backend, dynamic=True)
            count += 1
    return count
