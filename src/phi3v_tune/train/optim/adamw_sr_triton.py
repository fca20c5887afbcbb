"""The fused CUDA kernel of AdamWSR (adamw_sr.py): one pass per tensor reads p, g, m, v and writes p, m, v.

It computes exactly what adamw_sr.adamw_sr_torch_ computes, bit for bit: the same fp32 operations in the same order,
each rounded on its own (no fused multiply-add: `enable_fp_fusion=False`; IEEE division and square root), and the
same random bits (adamw_sr.mix32 applied twice to the element index and a per-stream key, integer arithmetic that every
backend computes alike). So the torch code is the reference the kernel is tested against, element by element
(tests/gpu/test_optim_kernel.py, and adamw_sr.kernel_matches_reference before first use on each GPU).

An earlier version drew its random bits from Triton's Philox stream, and its updates came out biased on the GPU
(benchmarks/RESULTS.md), which element-wise equality with the torch reference would have caught. Importing this module
never fails; `available()` says whether Triton is there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .adamw_sr import AdamWScalars

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
    def _mix32(x):
        """lowbias32 (see adamw_sr.mix32) on uint32 values; products wrap modulo 2**32."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _round_bf16(x, index_hash, key):
        """fp32 -> bf16 with stochastic rounding: add 16 random bits below the kept ones, then truncate."""
        bits = _mix32(index_hash ^ key) & 0xFFFF
        raw = x.to(tl.uint32, bitcast=True)
        raw = (raw + bits) & 0xFFFF0000
        rounded = raw.to(tl.float32, bitcast=True)
        return tl.where(x != x, x, rounded).to(tl.bfloat16)

    @triton.jit(do_not_specialize=["decay", "step_size", "inv_bc2_sqrt", "key_p", "key_m", "key_v"])
    def _adamw_sr_kernel(
        p_ptr, g_ptr, m_ptr, v_ptr, n,
        one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, inv_bc2_sqrt,
        key_p, key_m, key_v,
        STATES_BF16: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = m + one_minus_beta1 * (g - m)
        v = beta2 * v + one_minus_beta2 * (g * g)
        denom = tl.sqrt_rn(v) * inv_bc2_sqrt + eps
        p = p * decay - step_size * tl.div_rn(m, denom)
        index_hash = _mix32(offs.to(tl.uint32))
        tl.store(p_ptr + offs, _round_bf16(p, index_hash, key_p.to(tl.uint32)), mask=mask)
        if STATES_BF16:
            tl.store(m_ptr + offs, _round_bf16(m, index_hash, key_m.to(tl.uint32)), mask=mask)
            tl.store(v_ptr + offs, _round_bf16(v, index_hash, key_v.to(tl.uint32)), mask=mask)
        else:
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)


def adamw_sr_(
    p: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    hyper: AdamWScalars,
    keys: tuple[int, int, int],
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
        p, grad, exp_avg, exp_avg_sq, n,
        hyper.one_minus_beta1, hyper.beta2, hyper.one_minus_beta2, hyper.eps, hyper.decay, hyper.step_size,
        hyper.inv_bc2_sqrt, keys[0], keys[1], keys[2],
        STATES_BF16=exp_avg.dtype == torch.bfloat16, BLOCK=BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
