"""AdamW for bf16 weights that still absorbs small updates: fp32 math, stochastic rounding back to bf16.

Full fine-tuning with fp32 master weights costs 16 bytes per parameter (fp32 weights, gradients and two moments):
~62 GiB for Phi-3.5-vision's 4.15B. bf16 weights, gradients and moments need 8 bytes (~31 GiB), but a bf16 weight of magnitude 0.02 has a spacing of 1.2e-4: an AdamW step of lr 5e-6 rounds back to the
same value, so round-to-nearest bf16 training barely moves. Here every bf16 tensor (weight and, by default, both
moments) is updated in fp32 and written back with stochastic rounding: uniform random bits are added to the 16 low
bits of the fp32 value before they are cut off, so the rounded value equals the fp32 one on average and small steps
accumulate as they would in fp32. fp32 parameters in the same optimizer get the ordinary AdamW update.

The random bits come from a stream seeded by (seed, step, tensor index): the same seed gives the same run, and a
resume from a checkpoint (step stored per tensor, seed stored in the param groups) continues it identically. The
math runs in torch (the reference). A fused Triton kernel (optim_triton.py: one read of weight/gradient/moments and
one write per tensor) is opt-in with PHI3V_TRITON_SR=1: it passes its checks in Triton's CPU interpreter, but on an
H100 (2026-11-28) its mean update came out 27% short of fp32 (tests/gpu/test_optim_kernel.py), so it stays off
until that is found.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import torch

_MASK64 = (1 << 64) - 1


def stream_seed(seed: int, step: int, index: int) -> int:
    """A 31-bit seed for tensor `index` at `step` (splitmix64 finaliser over the three numbers)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + (index + 1) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & _MASK64
    x ^= x >> 32
    return x & 0x7FFFFFFF


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the distance from the lower neighbour (unbiased).

    Adding uniform 16-bit noise to the bit pattern and truncating does this for both signs (the bits are sign and
    magnitude); infinities stay infinite and NaNs stay NaN.
    """
    x = x.float().contiguous()
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    rounded = ((x.view(torch.int32) + noise) & -65536).view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)


def _triton_ok(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> bool:
    if not p.is_cuda:
        return False
    from . import optim_triton

    return optim_triton.available() and all(t.is_contiguous() for t in (p, grad, exp_avg, exp_avg_sq))


class AdamWSR(torch.optim.Optimizer):
    """torch's AdamW (decoupled weight decay, bias correction, same hyper-parameters) with stochastic rounding for
    bf16 tensors. `state_dtype` is the dtype of the moments of bf16 parameters (fp32 parameters keep fp32 moments)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        seed: int = 0,
        state_dtype: torch.dtype = torch.bfloat16,
        use_triton: bool | None = None,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW hyper-parameters: lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}")
        if state_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"state_dtype must be bfloat16 or float32, got {state_dtype}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, seed=int(seed))
        super().__init__(params, defaults)
        self.state_dtype = state_dtype
        if use_triton is None:  # the kernel is opt-in until it passes tests/gpu/test_optim_kernel.py on a GPU
            use_triton = True if os.environ.get("PHI3V_TRITON_SR") == "1" else False
        self.use_triton = use_triton  # True: the Triton kernel on CUDA; False: the torch code (the reference)

    # ----------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            for p in group["params"]:
                index += 1  # position among all parameters: part of the random stream's seed
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWSR does not support sparse gradients")
                if p.dtype not in (torch.bfloat16, torch.float32):
                    raise TypeError(f"AdamWSR updates bf16 or fp32 parameters, got {p.dtype}")
                state = self.state[p]
                if not state:
                    dtype = self.state_dtype if p.dtype == torch.bfloat16 else p.dtype
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                state["step"] += 1
                seed = stream_seed(group["seed"], state["step"], index)
                self._update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], group, state["step"], seed)
        return loss

    def _update(self, p, grad, exp_avg, exp_avg_sq, group: dict[str, Any], step: int, seed: int) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        if p.dtype == torch.float32:  # the ordinary AdamW update, in place (as torch's single-tensor AdamW)
            p.mul_(1 - lr * wd)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
            return
        use_triton = self.use_triton is not False and _triton_ok(p, grad, exp_avg, exp_avg_sq)
        if use_triton:
            from .optim_triton import adamw_sr_

            adamw_sr_(p, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, wd, bias_correction1,
                      bias_correction2_sqrt, seed)  # fmt: skip
            return
        if self.use_triton:
            raise RuntimeError("use_triton=True needs CUDA tensors, contiguous, and the triton package")
        adamw_sr_torch_(p, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, wd, bias_correction1,
                        bias_correction2_sqrt, seed)  # fmt: skip

    # ----------------------------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts loaded moments to the parameter's dtype; keep them in the dtype they were saved in instead
        (fp32 moments of a bf16 parameter must not pass through bf16)."""
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            for key in ("exp_avg", "exp_avg_sq"):
                value = saved.get(pid, {}).get(key)
                if isinstance(value, torch.Tensor) and value.dtype != self.state[p][key].dtype:
                    self.state[p][key] = value.to(device=p.device, dtype=value.dtype)


def adamw_sr_torch_(
    p: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction1: float,
    bias_correction2_sqrt: float,
    seed: int,
) -> None:
    """One AdamW step of a bf16 tensor in fp32; writes p (and bf16 moments) back with stochastic rounding."""
    g = grad.float()
    m = exp_avg.float().lerp_(g, 1 - beta1)
    v = exp_avg_sq.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    new_p = p.float().mul_(1 - lr * weight_decay).addcdiv_(m, denom, value=-lr / bias_correction1)
    gen = torch.Generator(device=p.device)
    gen.manual_seed(seed)
    p.copy_(stochastic_round_bf16(new_p, gen).view_as(p))
    for state, value in ((exp_avg, m), (exp_avg_sq, v)):
        state.copy_(stochastic_round_bf16(value, gen).view_as(state) if state.dtype == torch.bfloat16 else value)
