"""`--fused-lora`: the LoRA update added inside the second LoRA matmul's epilogue instead of by a separate kernel.

Why: PEFT computes a LoRA linear as `base(x) + lora_B(lora_A(x)) * scaling`. The `lora_B` matmul writes a full
(tokens x out_features) tensor, which an element-wise kernel then reads back together with the base output to write
the sum: at the DocVQA shape (two packed documents, 5,120 tokens) that is about 0.3 GB written and read again per
decoder layer and forward pass, for the four adapted linears (qkv, o, gate_up, down). `torch.addmm(base, xa, B^T,
alpha=scaling)` lets the matmul add its product to the base output as it writes it (cuBLAS's beta=1 epilogue): one
write of the sum, no intermediate. Autograd's own `addmm` backward gives the same gradients.

Only the plain case takes this path: one active adapter, no dropout (PEFT's `nn.Identity`), no DoRA or other variant,
no bias on `lora_B` (PEFT's `lora_bias`), not merged, adapters enabled, no extra forward arguments, and the base output
in the adapter's dtype (or autocast on, which runs `addmm` in its compute dtype). Anything else runs PEFT's own
forward unchanged. The modules keep their class's state and names (their class becomes a subclass of PEFT's), so
saving, loading and merging adapters are PEFT's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_FUSED_CLASSES: dict[type, type] = {}  # PEFT class -> its fused subclass
_PARENT: dict[type, type] = {}  # fused subclass -> the PEFT class it falls back to


def _plain_adapter(layer, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one active adapter when the fused path computes exactly what PEFT's forward does, else None.

    The dtype test is on the input: both layer kinds covered (`nn.Linear`, bitsandbytes `Linear4bit`) return their
    input's dtype, so a base output in another dtype than the adapter's (PEFT's type promotion, which one addmm cannot
    do) is known before the base layer runs."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if (
        name not in layer.lora_A
        or name in getattr(layer, "lora_variant", {})
        or getattr(layer, "use_dora", {}).get(name, False)
        or not isinstance(layer.lora_dropout[name], nn.Identity)
        or layer.lora_B[name].bias is not None  # PEFT's lora_bias: B adds a bias the addmm would leave out
        or (x.dtype != layer.lora_B[name].weight.dtype and not torch.is_autocast_enabled(x.device.type))
    ):
        return None
    return name


def _fused_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = _plain_adapter(self, x, args, kwargs)
    if name is None:
        return _PARENT[type(self)].forward(self, x, *args, **kwargs)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    result = self.base_layer(x)
    xa = nn.functional.linear(x.to(a.dtype), a)
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]), xa.reshape(-1, xa.shape[-1]), b.t(), alpha=self.scaling[name]
    )
    return out.view(result.shape).to(result.dtype)


def fused_class(cls: type) -> type:
    """A subclass of PEFT LoRA layer class `cls` whose forward adds the update in the matmul epilogue."""
    if cls in _PARENT:  # already fused
        return cls
    if cls not in _FUSED_CLASSES:
        sub = type(f"Fused{cls.__name__}", (cls,), {"forward": _fused_forward, "__module__": __name__})
        _FUSED_CLASSES[cls] = sub
        _PARENT[sub] = cls
    return _FUSED_CLASSES[cls]


def fuse_lora_layers(model: nn.Module) -> int:
    """Switch every PEFT LoRA linear (bf16/fp32 `Linear`, bitsandbytes 4-bit `Linear4bit`) of `model` to the fused
    forward; returns how many. Embedding and convolution adapters keep PEFT's."""
    from peft.tuners.lora.layer import Linear

    kinds: tuple[type, ...] = (Linear,)
    try:
        from peft.tuners.lora.bnb import Linear4bit

        kinds = (*kinds, Linear4bit)
    except ImportError:  # PEFT without bitsandbytes
        pass
    count = 0
    for module in model.modules():
        if isinstance(module, kinds):
            module.__class__ = fused_class(type(module))
            count += 1
    return count
