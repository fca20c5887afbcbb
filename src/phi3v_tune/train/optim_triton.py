"""The fused CUDA kernel of AdamWSR (optim.py): one pass per tensor reads p, g, m, v and writes p, m, v.

The math is optim.adamw_sr_torch_'s; the random bits come from Triton's Philox (`tl.randint4x`) keyed by the step's
seed and the element index, so results are deterministic but not bit-equal to the torch reference (different random
streams): both are unbiased roundings of the same fp32 values. Importing this module never fails; `available()` says
whether Triton is there.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

BLOCK = 1024


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _round_bf16(x, bits16):
        """fp32 -> bf16 with stochastic rounding: add 16 random bits below the kept ones, then truncate."""
        raw = x.to(tl.uint32, bitcast=True)
        raw = ((raw + (bits16 & 0xFFFF)) >> 16) << 16
        rounded = raw.to(tl.float32, bitcast=True)
        return tl.where(x != x, x, rounded).to(tl.bfloat16)

    @triton.jit(do_not_specialize=["seed", "lr", "step_size", "inv_bc2_sqrt"])
    def _adamw_sr_kernel(
        p_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        n,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        step_size,
        inv_bc2_sqrt,
        seed,
        STATES_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = m + (1.0 - beta1) * (g - m)
        v = beta2 * v + (1.0 - beta2) * g * g
        p = p * (1.0 - lr * weight_decay) - step_size * m / (tl.sqrt(v) * inv_bc2_sqrt + eps)
        r_p, r_m, r_v, _ = tl.randint4x(seed, offs)
        tl.store(p_ptr + offs, _round_bf16(p, r_p), mask=mask)
        if STATES_BF16:
            tl.store(m_ptr + offs, _round_bf16(m, r_m), mask=mask)
            tl.store(v_ptr + offs, _round_bf16(v, r_v), mask=mask)
        else:
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)


def adamw_sr_(
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
    """In place, on contiguous tensors of one device: p bf16; grad any float; moments both bf16 or both fp32."""
    if triton is None:
        raise RuntimeError("the triton package is not installed")
    n = p.numel()
    if n >= 2**31:
        raise ValueError("tensors of 2**31 elements or more are not supported")
    if exp_avg.dtype != exp_avg_sq.dtype:
        raise TypeError("exp_avg and exp_avg_sq must have the same dtype")
    if n == 0:
        return
    _adamw_sr_kernel[(triton.cdiv(n, BLOCK),)](
        p, grad, exp_avg, exp_avg_sq, n, lr, beta1, beta2, eps, weight_decay,
        lr / bias_correction1, 1.0 / bias_correction2_sqrt, seed,
        STATES_BF16=exp_avg.dtype == torch.bfloat16, BLOCK=BLOCK,
    )  # fmt: skip
