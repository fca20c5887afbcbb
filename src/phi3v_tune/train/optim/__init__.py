"""Optimizers beyond the Trainer's own: AdamW with stochastic rounding for bf16 weights (with its fused Triton
kernel), and any optimizer stepped inside backward."""

from __future__ import annotations

from .adamw_sr import AdamWSR
from .in_backward import OptimizerInBackward

__all__ = ["AdamWSR", "OptimizerInBackward"]
