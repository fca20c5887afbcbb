"""--fp8: the language model's linear layers multiply in float8, through torchao's float8 training.

Which layers: the decoder's `qkv_proj`, `o_proj`, `gate_up_proj` and `down_proj`, the same names LoRA targets
(`strategies.LM_LORA`): nearly all of the model's matmul work at the DocVQA shape. For full and freeze-vision these
are the trained layers (forward, input-gradient and weight-gradient matmuls in float8); under LoRA they are the frozen
bases inside PEFT's wrappers (`...qkv_proj.base_layer`), while the adapters, `lm_head`, the CLIP tower and the
projector keep bf16. Conversion happens after the strategy is applied, so the module names are final: PEFT's LoRA
`Linear` is not an `nn.Linear` itself, torchao swaps only its `base_layer`, and the adapters' gradients flow through
the wrapper as before.

What does not change: torchao's `Float8Linear` keeps the same weight `Parameter` (dtype, name, optimizer state), so
master weights (fp32 under autocast or bf16 with stochastic rounding), checkpoints and saved models are as without
--fp8. Inputs, weights and output gradients are cast to float8 with scales computed from the tensors themselves at
every step (dynamic scaling: tensorwise or rowwise), and the products come back in bf16.

Token counts: `torch._scaled_mm` needs the inner dimension of every product to be a multiple of 16. For the weight
gradient that dimension is the number of tokens in the forward pass, which varies from batch to batch (packed rows,
any sample length), so the layers pad it with zeros where needed (torchao's `pad_inner_dim`; exact: zero rows add
nothing to the product).

Compile: torchao's casts are meant to be fused by `torch.compile`; the regional compile of each decoder layer
(`compile.py`) covers the converted layers. Compiled, the weight-gradient matmul of a frozen LoRA base is dropped
from the backward graph; eager, it is computed and discarded.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from typing import Any

import torch
from torch import nn

from .strategies import LM_LORA

#: Float8 matmuls (`torch._scaled_mm`) run on NVIDIA GPUs of compute capability 8.9 (Ada) and later.
MIN_CAPABILITY = (8, 9)

#: The module names --fp8 converts: the decoder's linear layers, under any wrapper prefix (PEFT's
#: `base_model.model.`), or the frozen `base_layer` PEFT's LoRA wrapper holds.
FP8_LAYER = re.compile(rf"(?:.*\.)?{LM_LORA}(?:\.base_layer)?")

INSTALL = "pip install 'phi3v-tune[fp8]'"


def is_fp8_layer(name: str) -> bool:
    """Whether the module called `name` (as `named_modules` names it) multiplies in float8 under --fp8."""
    return FP8_LAYER.fullmatch(name) is not None


def torchao_problem() -> str | None:
    """Why torchao's float8 training cannot be used here (not installed, or not loading with this torch), or None."""
    if importlib.util.find_spec("torchao") is None:
        return f"--fp8 needs torchao: {INSTALL}"
    try:
        importlib.import_module("torchao.float8")
    except Exception as err:  # an install made for another torch fails in many ways
        return (
            f"--fp8: torchao is installed but its float8 training does not load with torch {torch.__version__} "
            f"({type(err).__name__}: {err}); install the torchao release made for this torch"
        )
    return None


def check_fp8_support(on_cuda: bool) -> None:
    """Refuse --fp8, before the model loads, where float8 matmuls cannot run: on the CPU, on a GPU older than compute
    capability 8.9, or without a working torchao."""
    if not on_cuda:
        raise ValueError(
            "--fp8 needs a CUDA GPU with float8 matmuls (compute capability 8.9 or later: Ada, Hopper, Blackwell); "
            "this run trains on the CPU: drop --fp8"
        )
    capability = torch.cuda.get_device_capability()
    if tuple(capability) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name()
        raise ValueError(
            f"--fp8 needs float8 matmuls, which GPUs of compute capability 8.9 or later have (Ada, Hopper, "
            f"Blackwell); this {name} has {capability[0]}.{capability[1]}: drop --fp8"
        )
    problem = torchao_problem()
    if problem:
        raise ValueError(problem)


def float8_config(scaling: str, *, emulate: bool = False) -> Any:
    """torchao's `Float8LinearConfig` for `scaling` (its recipe names "tensorwise" / "rowwise"), with the token
    dimension padded to a multiple of 16 where a batch needs it. `emulate`: float8 rounding with ordinary matmuls
    (torchao's CPU emulation, for tests)."""
    import dataclasses

    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(scaling)
    return dataclasses.replace(config, pad_inner_dim=True, emulate=emulate)


def convert_to_fp8(model: nn.Module, scaling: str, *, emulate: bool = False) -> list[str]:
    """Swap the linear layers `is_fp8_layer` names for torchao's `Float8Linear` (same weights), in place; returns
    their names."""
    from torchao.float8 import convert_to_float8_training

    converted: list[str] = []

    def chosen(module: nn.Module, name: str) -> bool:
        if is_fp8_layer(name):
            converted.append(name)
            return True
        return False

    convert_to_float8_training(model, module_filter_fn=chosen, config=float8_config(scaling, emulate=emulate))
    return converted


def float8_layers(model: nn.Module, scaling: str | None, *, compiled: bool, say=print) -> None:
    """--fp8 as the run resolved it (`Runtime.fp8`: the scaling, or None for off): convert and say what changed."""
    if scaling is None:
        return
    names = convert_to_fp8(model, scaling)
    if not names:
        raise ValueError(
            "--fp8: the model has no decoder linear layers to convert (qkv_proj, o_proj, gate_up_proj, ...)"
        )
    eager = "" if compiled else "; eager (--no-compile): the float8 casts are not fused, expect it slower than bf16"
    say(f"fp8: {len(names)} decoder linear layers multiply in float8 ({scaling} scaling, torchao){eager}")
