"""--fused-lora: the LoRA update added in the second matmul's epilogue (one addmm); loss, gradients, saved adapters
and every fallback case stay those of PEFT's own forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from answer_batch import answer_batch

from phi3v_tune.model.tiny import tiny_model
from phi3v_tune.train.config import TrainConfig
from phi3v_tune.train.fused_lora import fuse_lora_layers
from phi3v_tune.train.strategies import apply_strategy


@pytest.fixture(scope="module")
def batch(tiny_processor):
    return answer_batch(tiny_processor, "blue square", image_seed=2, image_hw=(280, 500))


def lora_model(tokenizer, fused: bool, **kw):
    cfg = TrainConfig(method="lora", lora_rank=4, fused_lora=fused, **kw)
    model = apply_strategy(tiny_model(tokenizer, seed=5), cfg)
    # LoRA B starts at zero (PEFT's init): give it values so the update is not trivially zero
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def loss_and_grads(model, inputs, labels):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_lora_gives_peft_loss_and_gradients(tiny_tokenizer, batch):
    from peft.tuners.lora.layer import Linear

    peft_model = lora_model(tiny_tokenizer, fused=False)
    fused = lora_model(tiny_tokenizer, fused=True)
    layers = [m for m in fused.modules() if isinstance(m, Linear)]
    assert layers and all(type(m).__name__ == "FusedLinear" for m in layers)
    assert not any(type(m).__name__.startswith("Fused") for m in peft_model.modules())
    loss0, grads0 = loss_and_grads(peft_model, *batch)
    loss1, grads1 = loss_and_grads(fused, *batch)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    assert grads1.keys() == grads0.keys() and any("lora_A" in n for n in grads0)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_lora_under_bf16_autocast_is_as_close_to_fp32_as_peft(tiny_tokenizer, batch):
    """Under bf16 autocast both paths round; the fused one rounds the sum once (in the matmul epilogue) where PEFT
    rounds the update, its scaling and the sum. Against the fp32 gradients, the fused ones are at least as close."""

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))

    loss_ref, ref = loss_and_grads(lora_model(tiny_tokenizer, fused=False), *batch)
    results = {}
    for fused in (False, True):
        model = lora_model(tiny_tokenizer, fused=fused)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[fused] = loss_and_grads(model, *batch)
    (loss_peft, peft_grads), (loss_fused, fused_grads) = results[False], results[True]
    assert abs(float(loss_fused - loss_ref)) <= abs(float(loss_peft - loss_ref)) + 2e-2
    lora = [n for n in ref if "lora_" in n]
    assert lora and fused_grads.keys() == peft_grads.keys()
    peft_cos = np.array([cos(peft_grads[n], ref[n]) for n in lora])
    fused_cos = np.array([cos(fused_grads[n], ref[n]) for n in lora])
    assert (fused_cos >= peft_cos - 0.01).all(), list(zip(lora, peft_cos, fused_cos))
    assert fused_cos.mean() > 0.95


def test_fused_lora_falls_back_to_peft_where_it_does_not_apply(tiny_tokenizer):
    """Dropout, a disabled adapter, merged weights and a base output of another dtype run PEFT's forward (bit-equal);
    saved adapters have the same keys and values."""
    from peft.tuners.lora.layer import Linear

    torch.manual_seed(0)
    peft_model = lora_model(tiny_tokenizer, fused=False, lora_dropout=0.5)
    fused = lora_model(tiny_tokenizer, fused=True, lora_dropout=0.5)
    plain_layer = next(m for m in peft_model.modules() if isinstance(m, Linear))
    layer = next(m for m in fused.modules() if isinstance(m, Linear))
    x = torch.randn(3, 7, layer.in_features)
    for mode in ("train", "eval"):  # dropout active in train: same generator state, same mask
        getattr(plain_layer, mode)()
        getattr(layer, mode)()
        torch.manual_seed(1)
        want = plain_layer(x)
        torch.manual_seed(1)
        torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    fused_state = {k: v for k, v in fused.state_dict().items() if "lora_" in k}
    plain_state = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert fused_state.keys() == plain_state.keys()
    for k in plain_state:
        torch.testing.assert_close(fused_state[k], plain_state[k], rtol=0, atol=0)

    model = lora_model(tiny_tokenizer, fused=True)
    layer = next(m for m in model.modules() if isinstance(m, Linear))
    base_out = layer.base_layer(x)
    with model.disable_adapter():
        torch.testing.assert_close(layer(x), base_out, rtol=0, atol=0)
    unmerged = layer(x)
    layer.merge()  # merged weights: PEFT's base-layer path (W + s B A), equal up to the order of fp32 sums
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-4, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # a bias on lora_B (PEFT's lora_bias): PEFT's forward, which adds it
        layer.lora_B["default"].bias = torch.nn.Parameter(torch.full((layer.out_features,), 0.5))
    torch.testing.assert_close(layer(x), unmerged + 0.5 * layer.scaling["default"], rtol=1e-5, atol=1e-4)
    layer.lora_B["default"].bias = None
    layer.base_layer.to(torch.float64)  # base output dtype differs from the adapter's: PEFT's type promotion
    out = layer(x.double())
    assert out.dtype == torch.float64


def test_fused_lora_compiles_and_keeps_the_numbers(tiny_tokenizer, batch):
    from phi3v_tune.train.compile import compile_layers

    eager = lora_model(tiny_tokenizer, fused=True)
    loss0, grads0 = loss_and_grads(eager, *batch)
    compiled = lora_model(tiny_tokenizer, fused=True)
    assert compile_layers(compiled, backend="aot_eager") > 0
    loss1, grads1 = loss_and_grads(compiled, *batch)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_fuse_is_idempotent_and_the_flag_is_for_lora_methods(tiny_tokenizer):
    model = lora_model(tiny_tokenizer, fused=True)
    classes = [type(m) for m in model.modules()]
    fuse_lora_layers(model)
    assert [type(m) for m in model.modules()] == classes
    for method in ("full", "freeze-vision"):
        with pytest.raises(ValueError, match="--fused-lora .* lora or qlora"):
            TrainConfig(data="x.jsonl", method=method, fused_lora=True).validate()
    assert TrainConfig(data="x.jsonl", method="qlora", fused_lora=True).validate().fused_lora
