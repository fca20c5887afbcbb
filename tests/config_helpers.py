"""Test helpers that apply a `TrainConfig` to one component the way `train/run.py` does (components take explicit
values, never the whole config)."""

from __future__ import annotations

from phi3v_tune.config import TrainConfig
from phi3v_tune.train.run import lora_settings
from phi3v_tune.train.runtime import Runtime
from phi3v_tune.train.strategies import apply_strategy


def strategy(model, cfg: TrainConfig):
    """`apply_strategy` with the method, LoRA settings and adapter dtype `cfg` resolves to on this machine."""
    return apply_strategy(
        model,
        cfg.method,
        freeze_projector=cfg.freeze_projector,
        lora=lora_settings(cfg),
        bf16_adapters=Runtime.resolve(cfg).master_weights == "bf16-sr",
    )
