"""AdamW for bf16 weights that still absorbs small updates: fp32 math, stochastic rounding back to bf16.

Full fine-tuning with fp32 master weights costs 16 bytes per parameter (fp32 weights, gradients and two moments):
~62 GiB for Phi-3.5-vision's 4.15B. bf16 weights, gradients and moments need 8 bytes (~31 GiB), but a bf16 weight of magnitude 0.02 has a spacing of 1.2e-4: an AdamW step of lr 5e-6 rounds back to the
same value, so round-to-nearest bf16 training barely moves. Here every bf16 tensor (weight and, by default, both
moments) is updated in fp32 and written back with stochastic rounding: uniform random bits are added to the 16 low
bits of the fp32 value before they are cut off, so the rounded value equals the fp32 one on average and small steps
accumulate as they would in fp32. fp32 parameters in the same optimizer get the ordinary AdamW update.

The random bits are a hash of the element's index and a key derived from (seed, step, tensor index): the same seed
gives the same run on any device, and a resume from a checkpoint (step stored per tensor, seed stored in the param
groups) continues it identically. The update of a bf16 tensor runs as one fused Triton kernel on CUDA
(adamw_sr_triton.py: one read of weight, gradient and moments and one write, per tensor) that computes bit for bit what
the torch code here computes (`adamw_sr_torch_`, the reference and the CPU path, ~40 tensor operations). Before its
first use on a GPU the kernel is run once on a small tensor and compared with the reference; if they differ it is
not used (a warning says so). PHI3V_TRITON_SR=0 turns it off, =1 insists on it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1


def stream_seed(seed: int, step: int, index: int) -> int:
    """A 31-bit seed for tensor `index` at `step` (splitmix64 finaliser over the three numbers)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + (index + 1) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & _MASK64
    x ^= x >> 32
    return x & 0x7FFFFFFF


def mix32_int(x: int) -> int:
    """lowbias32 (C. Wellons' 32-bit integer hash): x -> a well-mixed 32-bit value."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def stream_keys(seed: int, step: int, index: int) -> tuple[int, int, int]:
    """31-bit keys of the three random streams (weight, first and second moment) of one tensor at one step."""
    base = stream_seed(seed, step, index)
    return tuple(mix32_int(base + j * 0x9E3779B9) & 0x7FFFFFFF for j in range(3))  # type: ignore[return-value]


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 tensors of uint32 values, without int64 overflow (split c into 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """mix32_int element-wise on an int64 tensor of uint32 values (the kernel does the same in uint32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def index_hash(n: int, device: torch.device | str) -> torch.Tensor:
    """The per-element half of the random bits: mix32 of each flat index."""
    return mix32(torch.arange(n, device=device, dtype=torch.int64))


def stochastic_round_bf16(x: torch.Tensor, key: int, hashed_index: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the distance from the lower neighbour (unbiased).

    Adding uniform 16-bit noise to the bit pattern and truncating does this for both signs (the bits are sign and
    magnitude); infinities stay infinite and NaNs stay NaN. The noise of element i is mix32(mix32(i) ^ key) mod 2**16.
    """
    x = x.float().contiguous()
    if hashed_index is None:
        hashed_index = index_hash(x.numel(), x.device)
    noise = (mix32(hashed_index ^ key) & 0xFFFF).to(torch.int32).view(x.shape)
    rounded = ((x.view(torch.int32) + noise) & -65536).view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)


@dataclass(frozen=True)
class AdamWScalars:
    """The fp32 constants of one AdamW step, computed once in double precision so that the kernel and the torch
    reference multiply by the very same numbers."""

    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    decay: float  # 1 - lr * weight_decay
    step_size: float  # lr / (1 - beta1**step)
    inv_bc2_sqrt: float  # 1 / sqrt(1 - beta2**step)

    @classmethod
    def of(cls, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> AdamWScalars:
        return cls(1 - beta1, beta2, 1 - beta2, eps, 1 - lr * weight_decay, lr / (1 - beta1**step),
                   1 / math.sqrt(1 - beta2**step))  # fmt: skip


_KERNEL_CHECKED: dict[str, bool] = {}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a bf16 or fp32 tensor (NaN equals NaN, -0.0 differs from 0.0)."""
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def kernel_matches_reference(device: torch.device) -> bool:
    """Run the Triton kernel once on this device and compare every element with the torch reference (both moment
    dtypes, some non-finite values). False (with a warning) means the optimizer keeps to the torch code."""
    name = str(device)
    if name not in _KERNEL_CHECKED:
        from . import adamw_sr_triton as optim_triton

        ok = optim_triton.available()
        if ok:
            gen = torch.Generator().manual_seed(0)
            n = (1 << 16) + 123
            hyper = AdamWScalars.of(5e-6, 0.9, 0.95, 1e-7, 0.01, 3)
            for dtype in (torch.bfloat16, torch.float32):
                p = (torch.randn(n, generator=gen) * 0.02).bfloat16()
                p[:3] = torch.tensor([float("inf"), float("nan"), 0.0])
                g = (torch.randn(n, generator=gen) * 1e-3).bfloat16()
                m = (torch.randn(n, generator=gen) * 1e-3).to(dtype)
                v = (torch.rand(n, generator=gen) * 2e-6).to(dtype)
                want = [t.to(device) for t in (p, g, m, v)]
                got = [t.clone() for t in want]
                adamw_sr_torch_(*want, hyper, (11, 22, 33))
                optim_triton.adamw_sr_(*got, hyper, (11, 22, 33))
                ok = ok and all(torch.equal(_bits(a), _bits(b)) for a, b in zip(want, got))
            if not ok:
                warnings.warn(
                    f"the fused AdamWSR kernel does not reproduce the torch reference on {name}; using the (slower) "
                    "torch code instead", stacklevel=2,
                )  # fmt: skip
        _KERNEL_CHECKED[name] = ok
    return _KERNEL_CHECKED[name]


def _triton_ok(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> bool:
    if not p.is_cuda:
        return False
    from . import adamw_sr_triton as optim_triton

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
        if use_triton is None:
            use_triton = {"1": True, "0": False}.get(os.environ.get("PHI3V_TRITON_SR", ""))
        # None: the Triton kernel on CUDA where it reproduces the reference; True: insist; False: the torch code
        self.use_triton = use_triton

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
                if p.grad is not None:
                    self.step_param(p, group, index)
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        """Update one parameter from its gradient; `index` is its position among all parameters (what `step` passes;
        `in_backward.OptimizerInBackward` calls this as each gradient is ready)."""
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
        keys = stream_keys(group["seed"], state["step"], index)
        self._update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], group, state["step"], keys)

    def _update(self, p, grad, exp_avg, exp_avg_sq, group: dict[str, Any], step: int, keys) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if p.dtype == torch.float32:  # the ordinary AdamW update, in place (as torch's single-tensor AdamW)
            bias_correction1 = 1 - beta1**step
            bias_correction2_sqrt = math.sqrt(1 - beta2**step)
            p.mul_(1 - lr * wd)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
            return
        hyper = AdamWScalars.of(lr, beta1, beta2, eps, wd, step)
        fits = _triton_ok(p, grad, exp_avg, exp_avg_sq)
        if self.use_triton is True and not fits:
            raise RuntimeError("use_triton=True needs CUDA tensors, contiguous, and the triton package")
        if fits and self.use_triton is not False and (self.use_triton or kernel_matches_reference(p.device)):
            from .adamw_sr_triton import adamw_sr_

            adamw_sr_(p, grad, exp_avg, exp_avg_sq, hyper, keys)
            return
        adamw_sr_torch_(p, grad, exp_avg, exp_avg_sq, hyper, keys)

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
    hyper: AdamWScalars,
    keys: tuple[int, int, int],
) -> None:
    """One AdamW step of a bf16 tensor in fp32; writes p (and bf16 moments) back with stochastic rounding.

    Each line is one fp32 operation per element, in the order the kernel does them (the kernel matches bit for bit).
    """
    g = grad.float()
    m = exp_avg.float()
    v = exp_avg_sq.float()
    m = m + (g - m) * hyper.one_minus_beta1
    v = v * hyper.beta2 + (g * g) * hyper.one_minus_beta2
    denom = v.sqrt() * hyper.inv_bc2_sqrt + hyper.eps
    new_p = p.float() * hyper.decay - (m / denom) * hyper.step_size
    hashed = index_hash(p.numel(), p.device).view(p.shape)
    p.copy_(stochastic_round_bf16(new_p, keys[0], hashed))
    for state, value, key in ((exp_avg, m, keys[1]), (exp_avg_sq, v, keys[2])):
        state.copy_(stochastic_round_bf16(value, key, hashed) if state.dtype == torch.bfloat16 else value)
