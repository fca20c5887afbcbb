"""--fp8 on a GPU with float8 matmuls (compute capability 8.9+, torchao installed): real `torch._scaled_mm` products
agree with bf16 within float8 rounding at token counts that are no multiple of 16, compiled as training compiles
them, under LoRA (gradients reach the adapters, also with fp32 adapters under autocast), and a whole training run
writes the same checkpoint keys as without --fp8."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA GPU with float8 matmuls (compute capability 8.9+)",
)


@pytest.fixture(autouse=True)
def torchao():
    pytest.importorskip("torchao.float8")


def _ids(tokenizer, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(5, len(tokenizer) - 1, (1, length), generator=gen).to("cuda")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("scaling, master", [("tensorwise", "bf16-sr"), ("rowwise", "bf16-sr"), ("tensorwise", "fp32")])
def test_float8_full_step_agrees_with_bf16_at_odd_token_counts(tiny_tokenizer, scaling, master):
    """bf16 weights without autocast (bf16-sr master weights) or fp32 weights under bf16 autocast (fp32 master
    weights): every trained weight gets a gradient of its own dtype, within float8 rounding of the bf16 run's."""
    from phi3v_tune.model.tiny import tiny_model
    from phi3v_tune.train.fp8 import convert_to_fp8
    from phi3v_tune.train.strategies import apply_strategy

    ids = _ids(tiny_tokenizer, 37)  # the weight gradient's inner dimension: 37 tokens, padded to 48 by the layers
    dtype = torch.bfloat16 if master == "bf16-sr" else torch.float32

    def step(fp8: bool):
        model = apply_strategy(tiny_model(tiny_tokenizer, seed=2).to("cuda", dtype).train(), "full")
        if fp8:
            assert len(convert_to_fp8(model, scaling)) == 8
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=master == "fp32"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss.detach()), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step(False)
    loss8, grads8 = step(True)
    assert abs(loss8 - loss) < 1e-2 * loss
    assert grads8.keys() == grads.keys()
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads8.values())
    errors = {n: _rel(grads8[n], grads[n]) for n in grads}
    assert max(errors.values()) < 0.2, errors
    assert errors["model.layers.0.mlp.gate_up_proj.weight"] > 1e-3  # float8 products, not bf16 ones


def test_compiled_float8_layers_agree_with_eager_ones_across_lengths(tiny_tokenizer):
    """Regional compile (inductor, dynamic shapes) fuses torchao's casts; the numbers stay those of the eager
    float8 layers, at lengths that need the token padding and lengths that do not."""
    import torch._dynamo

    from phi3v_tune.model.tiny import tiny_model
    from phi3v_tune.train.compile import compile_layers
    from phi3v_tune.train.fp8 import convert_to_fp8
    from phi3v_tune.train.strategies import apply_strategy

    torch._dynamo.reset()
    models = []
    for compiled in (False, True):
        model = apply_strategy(tiny_model(tiny_tokenizer, seed=2).to("cuda", torch.bfloat16).train(), "full")
        convert_to_fp8(model, "tensorwise")
        if compiled:
            assert compile_layers(model) == 2 + 3
        models.append(model)
    for length in (37, 64, 53):
        ids = _ids(tiny_tokenizer, length, seed=length)
        results = []
        for model in models:
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            results.append((float(loss.detach()), model.model.layers[1].mlp.down_proj.weight.grad.clone()))
        (eager_loss, eager_grad), (compiled_loss, compiled_grad) = results
        assert abs(compiled_loss - eager_loss) < 5e-3 * eager_loss, length
        assert _rel(compiled_grad, eager_grad) < 5e-2, length


@pytest.mark.parametrize("master", ["bf16-sr", "fp32"])
def test_float8_bases_under_lora_pass_gradients_to_the_adapters(tiny_tokenizer, master):
    """The frozen bases multiply in float8; the adapters (bf16, or fp32 under bf16 autocast) get the gradients of
    the bf16 model within float8 rounding."""
    import torch.nn as nn

    from phi3v_tune.model.tiny import tiny_model
    from phi3v_tune.train.fp8 import convert_to_fp8
    from phi3v_tune.train.strategies import apply_strategy

    ids = _ids(tiny_tokenizer, 45)

    def step(fp8: bool):
        base = tiny_model(tiny_tokenizer, seed=2).to("cuda", torch.bfloat16).train()
        model = apply_strategy(base, "lora", bf16_adapters=master == "bf16-sr")
        for name, param in model.named_parameters():  # B starts at zero, which would hide a broken path
            if "lora_B" in name:
                nn.init.normal_(param, std=0.02, generator=torch.Generator("cuda").manual_seed(1))
        if fp8:
            assert len(convert_to_fp8(model, "tensorwise")) == 8
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=master == "fp32"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    grads, grads8 = step(False), step(True)
    assert len(grads8) == 2 * 2 * 4 + 2
    for name in grads:
        assert grads8[name] is not None and torch.isfinite(grads8[name]).all(), name
        assert grads8[name].dtype == (torch.bfloat16 if master == "bf16-sr" else torch.float32)
        assert _rel(grads8[name], grads[name]) < 0.2, name


def test_fp8_training_run_writes_the_usual_model(tmp_path):
    """`train --fp8` end to end on the default GPU path (bf16-sr, compiled layers, packed pairs): the run says what
    it converted, trains, and final/ holds the same weights, in the same dtype, as a run without --fp8 writes."""
    import contextlib
    import io

    from safetensors.torch import load_file

    from phi3v_tune.config import TrainConfig
    from phi3v_tune.data.synthetic import demo_split, write_jsonl
    from phi3v_tune.train.run import run_training

    train, _ = demo_split(4, 0, seed=1, tasks=("colour",), as_png=True)
    data = write_jsonl(train, tmp_path / "data")
    finals, first_losses = {}, {}
    for fp8 in (False, True):
        out = tmp_path / f"run-{fp8}"
        cfg = TrainConfig(data=str(data), model="tiny", num_crops=1, output_dir=str(out), max_steps=2, batch_size=2,
                          batch_size_per_device=2, learning_rate=1e-3, warmup_steps=0, report_to="none",
                          num_workers=0, progress=False, fp8=fp8)  # fmt: skip
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            metrics = run_training(cfg)
        said = "fp8: 8 decoder linear layers multiply in float8 (tensorwise scaling, torchao)" in printed.getvalue()
        assert said is fp8
        losses = [e["loss"] for e in metrics["log_history"] if "loss" in e]
        assert len(losses) == 2 and all(np.isfinite(losses))
        first_losses[fp8] = losses[0]  # step 1: the same weights and batch, so float8 rounding is the only change
        finals[fp8] = load_file(out / "final" / "model.safetensors")
    assert abs(first_losses[True] - first_losses[False]) < 2e-2 * first_losses[False]
    assert finals[True].keys() == finals[False].keys()
    assert all(finals[True][k].dtype == finals[False][k].dtype for k in finals[False])
