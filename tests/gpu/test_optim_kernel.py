"""AdamWSR's Triton kernel against the torch reference (train/optim/adamw_sr.py): bit for bit equal to it; every result is
one of the two bf16 neighbours of the fp32 update, rounded up as often as the fp32 value's position between them
says (unbiased), exact where the fp32 result is representable, and deterministic per seed.

Runs on a CUDA GPU; tests/test_optim.py also runs it on the CPU under TRITON_INTERPRET=1 (sizes shrink there).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu" if INTERPRET else None
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU (or TRITON_INTERPRET=1)")
N = 1 << 14 if INTERPRET else 1 << 22
B1, B2, EPS, WD, LR, STEP = 0.9, 0.95, 1e-7, 0.01, 5e-6, 3
BC1, BC2_SQRT = 1 - B1**STEP, math.sqrt(1 - B2**STEP)


def fp32_update(p, g, m, v):
    g, m, v, p = g.float(), m.float(), v.float(), p.float()
    m = m + (1 - B1) * (g - m)
    v = B2 * v + (1 - B2) * g * g
    return p * (1 - LR * WD) - LR / BC1 * m / (v.sqrt() / BC2_SQRT + EPS), m, v


def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two bf16 values around fp32 `x` (truncation toward zero, and one spacing further out)."""
    bits = x.view(torch.int32) & -65536
    low = bits.view(torch.float32)
    high = (bits + 65536).view(torch.float32)
    return low, high


def keys(seed: int) -> tuple[int, int, int]:
    from phi3v_tune.train.optim.adamw_sr import stream_keys

    return stream_keys(seed, STEP, 0)


def kernel(p, g, m, v, seed, lr=LR):
    from phi3v_tune.train.optim.adamw_sr import AdamWScalars
    from phi3v_tune.train.optim.adamw_sr_triton import adamw_sr_

    p, m, v = p.clone(), m.clone(), v.clone()
    adamw_sr_(p, g, m, v, AdamWScalars.of(lr, B1, B2, EPS, WD, STEP), keys(seed))
    return p, m, v


def reference(p, g, m, v, seed, lr=LR):
    from phi3v_tune.train.optim.adamw_sr import AdamWScalars, adamw_sr_torch_

    p, m, v = p.clone(), m.clone(), v.clone()
    adamw_sr_torch_(p, g, m, v, AdamWScalars.of(lr, B1, B2, EPS, WD, STEP), keys(seed))
    return p, m, v


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32])
def test_kernel_equals_the_torch_reference_bit_for_bit(state_dtype):
    p, g, m, v = inputs(N, seed=2)
    m, v = m.to(state_dtype), v.to(state_dtype)
    p[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    got, want = kernel(p, g, m, v, seed=4), reference(p, g, m, v, seed=4)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        bits = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
        differ = a.view(bits) != b.view(bits)
        assert not bool(differ.any()), (int(differ.sum()), a[differ][:5], b[differ][:5])


def inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p = (torch.randn(n, generator=g) * 0.02).bfloat16()
    grad = (torch.randn(n, generator=g) * 1e-3).bfloat16()
    m = (torch.randn(n, generator=g) * 1e-3).bfloat16()
    v = (torch.rand(n, generator=g) * 2e-6).bfloat16()
    return [t.to(DEVICE) for t in (p, grad, m, v)]


def test_each_value_is_a_bf16_neighbour_of_the_fp32_update():
    p, g, m, v = inputs(N)
    got = kernel(p, g, m, v, seed=1)
    for out, want in zip(got, fp32_update(p, g, m, v)):
        low, high = neighbours(want)
        # within one bf16 spacing of the fp32 value (a hair more: the kernel's fp32 arithmetic may differ by an ulp)
        close = (out.float() - want).abs() <= (high - low).abs() * (1 + 1e-3)
        assert bool(close.all()), float((~close).float().mean())


def test_rounding_is_unbiased():
    """One value repeated: the fraction rounded up equals the fp32 value's position between its neighbours."""
    p = torch.full((N,), 0.02, dtype=torch.bfloat16, device=DEVICE)
    g = torch.full((N,), 1.3e-3, dtype=torch.bfloat16, device=DEVICE)
    m = torch.full((N,), 0.7e-3, dtype=torch.bfloat16, device=DEVICE)
    v = torch.full((N,), 1.1e-6, dtype=torch.bfloat16, device=DEVICE)
    got = kernel(p, g, m, v, seed=7)
    for out, want in zip(got, fp32_update(p[:1], g[:1], m[:1], v[:1])):
        low, high = neighbours(want)
        expected = float((want - low) / (high - low))
        frac = float((out.float() == high).float().mean())
        tolerance = 5 * math.sqrt(max(expected * (1 - expected), 1e-6) / N) + 1e-6
        assert abs(frac - expected) < tolerance, (frac, expected)


def test_mean_over_many_elements_matches_fp32_and_the_torch_reference():
    p, g, m, v = inputs(N, seed=3)
    want, _, _ = fp32_update(p, g, m, v)
    got, _, _ = kernel(p, g, m, v, seed=11)
    ref, _, _ = reference(p, g, m, v, seed=12)
    step = want - p.float()
    for out in (got, ref):
        noise = (out.float() - want) * step.sign()
        drift = float(noise.sum() / step.abs().sum())
        standard_error = float(noise.std() * math.sqrt(N) / step.abs().sum())
        assert abs(drift) < 5 * standard_error, (drift, standard_error)  # rounding noise cancels: no drift


def test_exact_when_the_result_is_representable_and_deterministic_per_seed():
    p, g, m, v = inputs(N, seed=5)
    zero_lr, _, _ = kernel(p, g, m, v, seed=3, lr=0.0)
    assert torch.equal(zero_lr, p)  # p * 1 - 0 is p itself
    a, b, c = kernel(p, g, m, v, seed=9), kernel(p, g, m, v, seed=9), kernel(p, g, m, v, seed=10)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_optimizer_uses_the_kernel_on_cuda_and_fp32_moments_work():
    if DEVICE != "cuda":
        pytest.skip("the optimizer dispatches to the kernel on CUDA tensors only")
    from phi3v_tune.train.optim import AdamWSR

    for state_dtype in (torch.bfloat16, torch.float32):
        p, g, _, _ = inputs(N, seed=8)
        a, b = torch.nn.Parameter(p.clone()), torch.nn.Parameter(p.clone())
        fast = AdamWSR([a], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD, state_dtype=state_dtype, use_triton=True)
        slow = AdamWSR([b], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD, state_dtype=state_dtype, use_triton=False)
        for _ in range(20):
            a.grad, b.grad = g.clone(), g.clone()
            fast.step()
            slow.step()
        assert torch.equal(a.detach(), b.detach())  # 20 steps of kernel and torch code: the same bits
        assert torch.equal(fast.state[a]["exp_avg_sq"], slow.state[b]["exp_avg_sq"])
        assert fast.state[a]["exp_avg"].dtype == state_dtype


def test_the_optimizer_checks_the_kernel_and_picks_it_by_default():
    if DEVICE != "cuda":
        pytest.skip("the optimizer dispatches to the kernel on CUDA tensors only")
    from phi3v_tune.train.optim.adamw_sr import AdamWSR, kernel_matches_reference

    assert kernel_matches_reference(torch.device("cuda", torch.cuda.current_device()))
    assert AdamWSR([torch.nn.Parameter(torch.zeros(4, device="cuda"))]).use_triton in (None, True)
