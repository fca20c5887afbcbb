"""The model a run trains: loaded in the run's dtype, the strategy applied (what trains), then float8 linear layers,
activation checkpointing and regional compilation where the run asks for them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..model.modeling import Phi3VForCausalLM
from .compile import compile_layers
from .fp8 import float8_layers
from .runtime import Runtime
from .strategies import LoraSettings, apply_strategy, checkpoint_only, count_parameters, qlora_quantization_config


@dataclass(frozen=True)
class Checkpointing:
    """--gradient-checkpointing and what it covers (see `strategies.checkpoint_only`)."""

    enabled: bool = False
    scope: str = "all"
    decoder_layers: int | None = None


def load_model(folder: str, runtime: Runtime, method: str) -> Phi3VForCausalLM:
    """The base model in the dtype the run trains it in (`Runtime.weights_dtype`), 4-bit for qlora."""
    kwargs: dict[str, Any] = {
        "attn_implementation": runtime.attn_implementation,
        "dtype": runtime.weights_dtype(method),
    }
    if method == "qlora":
        kwargs["quantization_config"] = qlora_quantization_config(runtime.compute_dtype)
    return Phi3VForCausalLM.from_pretrained(folder, **kwargs)


def prepare_model(
    model: Phi3VForCausalLM,
    runtime: Runtime,
    method: str,
    *,
    freeze_projector: bool = False,
    lora: LoraSettings | None = None,
    checkpointing: Checkpointing = Checkpointing(),
    compile_fall_back: bool = True,
    say=print,
) -> nn.Module:
    """Set what trains (`method`), checkpoint and compile layers as the run says: the model the Trainer gets.

    `compile_fall_back`: compile was chosen by default, not asked for, so a layer that fails to compile runs eagerly."""
    model = apply_strategy(
        model,
        method,
        freeze_projector=freeze_projector,
        lora=lora,
        bf16_adapters=runtime.master_weights == "bf16-sr",
    )
    weights = f", {runtime.master_weights} master weights" if method in ("full", "freeze-vision") else ""
    say(f"method {method}{weights}: {count_parameters(model)}")
    float8_layers(model, runtime.fp8, compiled=runtime.compile, say=say)  # --fp8: after the strategy, names final
    if checkpointing.enabled:  # ours, not the Trainer's switch, which would also wrap every frozen CLIP layer
        layers = checkpoint_only(model, checkpointing.scope, checkpointing.decoder_layers)
        which = "" if checkpointing.decoder_layers is None else f", first {checkpointing.decoder_layers} decoder layers"
        say(f"activation checkpointing: {layers} layers (scope {checkpointing.scope}{which})")
    if runtime.compile:
        count = compile_layers(model, fall_back=compile_fall_back)
        say(f"torch.compile: {count} layers (compiled on first use; --no-compile runs them eagerly)")
    return model
