"""Regional `torch.compile`: each decoder layer and CLIP encoder layer compiled on its own.

Why regional: the layers are identical, so one compilation serves all 32 (and all 23 CLIP layers) and compile time
stays around a minute; the model around them (image scatter, loss, PEFT wrappers) stays eager and flexible. Inductor
fuses the elementwise work between the matmuls (RMSNorm, RoPE, SiLU-gate, residual adds, LoRA scaling) and cuts
kernel launches, which matters at batch 1. Sequence lengths vary from batch to batch, so the layers are compiled
with dynamic shapes from the start (one compilation instead of one per new length).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

LAYER_CLASSES = ("Phi3DecoderLayer", "CLIPEncoderLayer")


def compile_layers(model: nn.Module, backend: Any = "inductor", fall_back: bool = False) -> int:
    """Compile every decoder / CLIP encoder layer of `model` in place; returns how many were compiled.

    `fall_back` (compile chosen by default, not asked for): a layer that fails to compile (a GPU without Triton
    support, an unsupported op) runs eagerly with dynamo's warning instead of stopping the run.
    """
    if fall_back:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
    options = None
    if backend == "inductor" and os.environ.get("PHI3V_INDUCTOR_CPP_WRAPPER") == "1":
        # benchmark knob: inductor's C++ wrapper launches a layer's kernels from C++ rather than generated Python
        # (less host time per layer, a longer first compile); same kernels, so the same numbers
        options = {"cpp_wrapper": True}
    count = 0
    for module in model.modules():
        if type(module).__name__ in LAYER_CLASSES:
            module.compile(backend=backend, dynamic=True, options=options)
            count += 1
    return count
