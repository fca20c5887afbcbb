"""--fp8: what it refuses and why, which layers it converts, how the run resolves it, and (where torchao is installed)
the conversion itself, with float8 rounding emulated on the CPU."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from torch import nn

from phi3v_tune.config import TrainConfig
from phi3v_tune.train import fp8 as fp8_module
from phi3v_tune.train.fp8 import is_fp8_layer
from phi3v_tune.train.runtime import Runtime
from phi3v_tune.train.strategies import LoraSettings, apply_strategy

PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def expected_layers(layers: int, prefix: str = "", suffix: str = "") -> set[str]:
    """The decoder linear layers --fp8 converts, spelt out independently of the module's pattern."""
    return {f"{prefix}model.layers.{i}.{p}{suffix}" for i in range(layers) for p in PROJECTIONS}


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA GPU of compute capability `gpu(major, minor)` as far as the settings checks can tell."""

    def make(major: int = 9, minor: int = 0) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: f"Test GPU sm{major}{minor}")

    return make


# -- settings that cannot combine: refused by validate(), before anything loads ----------------------------------------
@pytest.mark.parametrize(
    "settings, words",
    [
        (dict(cpu=True), r"--fp8 cannot be combined with --cpu \(float8 matmuls run on a CUDA GPU\)"),
        (dict(fp16=True), r"--fp8 cannot be combined with --fp16 \(float8 training computes in bf16\)"),
        (dict(method="qlora"), r"--fp8 cannot be combined with --method qlora \(its weights are 4-bit"),
        (dict(deepspeed="configs/deepspeed/zero2.json"), r"--fp8 cannot be combined with --deepspeed"),
        (dict(fsdp=True), r"--fp8 cannot be combined with --fsdp"),
    ],
)
def test_fp8_refuses_settings_it_cannot_combine_with(settings, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(data="x.jsonl", fp8=True, **settings).validate()


def test_fp8_names_every_conflict_at_once_and_refuses_a_deepspeed_launch(monkeypatch):
    with pytest.raises(ValueError, match="--cpu .*; --fp16 .*; --method qlora"):
        TrainConfig(data="x.jsonl", fp8=True, cpu=True, fp16=True, method="qlora").validate()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")  # accelerate launch with a DeepSpeed config
    with pytest.raises(ValueError, match="--fp8 cannot be combined with --deepspeed"):
        TrainConfig(data="x.jsonl", fp8=True).validate()


def test_fp8_scaling_needs_fp8_and_takes_the_two_recipes():
    with pytest.raises(ValueError, match="--fp8-scaling rowwise needs --fp8"):
        TrainConfig(data="x.jsonl", fp8_scaling="rowwise").validate()
    with pytest.raises(ValueError, match="--fp8-scaling must be one of tensorwise, rowwise, got 'blockwise'"):
        TrainConfig(data="x.jsonl", fp8=True, fp8_scaling="blockwise").validate()
    for method in ("full", "freeze-vision", "lora"):  # what --fp8 is for, with both master-weight kinds
        for master in ("auto", "fp32", "bf16-sr"):
            TrainConfig(data="x.jsonl", fp8=True, method=method, master_weights=master).validate()
    TrainConfig(data="x.jsonl", fp8=True, fp8_scaling="rowwise", optimizer_in_backward=True, max_grad_norm=0,
                batch_size=1).validate()  # fmt: skip


# -- what the machine must have: refused when the run resolves, before the model loads ---------------------------------
def test_fp8_is_refused_without_a_cuda_gpu():
    assert not torch.cuda.is_available()  # this CPU machine
    with pytest.raises(ValueError, match=r"--fp8 needs a CUDA GPU with float8 matmuls .*trains on the CPU"):
        Runtime.resolve(TrainConfig(data="x.jsonl", fp8=True))


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (7, 5)])
def test_fp8_is_refused_on_a_gpu_without_float8(gpu, capability):
    gpu(*capability)
    major, minor = capability
    with pytest.raises(
        ValueError, match=rf"compute capability 8.9 or later .*Test GPU sm{major}{minor} has {major}\.{minor}"
    ):
        Runtime.resolve(TrainConfig(data="x.jsonl", fp8=True))


def test_fp8_is_refused_without_torchao(gpu, monkeypatch):
    gpu(9, 0)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ValueError, match=r"--fp8 needs torchao: pip install 'phi3v-tune\[fp8\]'"):
        Runtime.resolve(TrainConfig(data="x.jsonl", fp8=True))


def test_fp8_names_a_torchao_that_does_not_load_with_this_torch(gpu, monkeypatch):
    gpu(9, 0)
    real_find, real_import = importlib.util.find_spec, importlib.import_module
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "torchao" else real_find(name, *a)
    )

    def broken(name, *a):
        if name.startswith("torchao"):
            raise ImportError("undefined symbol: _ZN3c10")
        return real_import(name, *a)

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(
        ValueError, match=rf"torchao is installed but .* torch {re.escape(torch.__version__)} .*undefined symbol"
    ):
        Runtime.resolve(TrainConfig(data="x.jsonl", fp8=True))


def test_runtime_resolves_fp8_to_the_scaling_on_a_float8_gpu(gpu, monkeypatch):
    assert Runtime.resolve(TrainConfig(data="x.jsonl")).fp8 is None
    gpu(8, 9)  # Ada: the oldest float8 GPU
    monkeypatch.setattr(fp8_module, "torchao_problem", lambda: None)  # as where torchao is installed
    assert Runtime.resolve(TrainConfig(data="x.jsonl")).fp8 is None
    runtime = Runtime.resolve(TrainConfig(data="x.jsonl", fp8=True))
    assert runtime.fp8 == "tensorwise" and runtime.bf16 and not runtime.fp16 and runtime.compile
    assert runtime.master_weights == "bf16-sr"  # float8 matmuls over bf16 weights with stochastic rounding
    gpu(9, 0)
    assert Runtime.resolve(TrainConfig(data="x.jsonl", fp8=True, fp8_scaling="rowwise")).fp8 == "rowwise"
    lora = Runtime.resolve(TrainConfig(data="x.jsonl", fp8=True, method="lora", master_weights="fp32"))
    assert lora.fp8 == "tensorwise" and lora.autocast_bf16


# -- which layers -------------------------------------------------------------------------------------------------------
def test_fp8_converts_exactly_the_decoder_linear_layers(tiny_tokenizer):
    from phi3v_tune.model.tiny import tiny_model

    model = tiny_model(tiny_tokenizer, num_hidden_layers=3)
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = {name for name in linears if is_fp8_layer(name)}
    assert chosen == expected_layers(3)
    left = linears - chosen  # lm_head, CLIP's projections and MLPs, the image projector stay bf16
    assert "lm_head" in left and "model.vision_embed_tokens.img_projection.0" in left
    assert any(".img_processor.vision_model.encoder.layers.0.self_attn.q_proj" in name for name in left)


@pytest.mark.parametrize("vision", [False, True])
def test_fp8_under_lora_converts_the_frozen_bases_never_the_adapters(tiny_tokenizer, vision):
    from phi3v_tune.model.tiny import tiny_model

    model = apply_strategy(tiny_model(tiny_tokenizer), "lora", lora=LoraSettings(rank=16, vision=vision))
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = {name for name in linears if is_fp8_layer(name)}
    assert chosen == expected_layers(2, prefix="base_model.model.", suffix=".base_layer")
    adapters = {name for name in linears if ".lora_A." in name or ".lora_B." in name}
    assert adapters and not adapters & chosen  # the adapters (rank 16: float8-sized) stay bf16
    assert "base_model.model.lm_head.base_layer" in linears - chosen
    # PEFT's wrappers themselves are no nn.Linear: torchao's swap can only reach their base layers
    wrapper = model.get_submodule("base_model.model.model.layers.0.self_attn.qkv_proj")
    assert not isinstance(wrapper, nn.Linear) and not is_fp8_layer("base_model.model.model.layers.0.self_attn")


def test_fp8_layer_names_are_matched_whole():
    assert is_fp8_layer("model.layers.31.mlp.down_proj")
    assert is_fp8_layer("module.model.layers.0.self_attn.o_proj")  # a DDP wrapper's prefix
    for name in (
        "model.layers.0.mlp",
        "model.layers.0.mlp.down_proj.lora_A.default",
        "model.layers.0.mlp.down_proj.base_layer.weight",
        "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1",
        "model.layers.x.self_attn.qkv_proj",
        "lm_head",
    ):
        assert not is_fp8_layer(name), name


# -- the conversion (torchao installed; float8 rounding emulated on the CPU) ----------------------------------------------
def _batch(tokenizer, length: int = 37):
    ids = torch.randint(5, len(tokenizer) - 1, (1, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def test_prepare_model_swaps_in_float8_linears_and_keeps_the_weights(tiny_tokenizer, gpu, monkeypatch):
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    from phi3v_tune.model.tiny import tiny_model
    from phi3v_tune.train.model_setup import prepare_model

    gpu(9, 0)
    runtime = Runtime.resolve(TrainConfig(data="x.jsonl", fp8=True, compile=False))
    monkeypatch.undo()  # the model itself stays on this CPU
    model = tiny_model(tiny_tokenizer)
    weights = {name: p for name, p in model.named_parameters()}
    said: list[str] = []
    model = prepare_model(model, runtime, "full", say=said.append)
    converted = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert converted == expected_layers(2)
    assert {name for name, m in model.named_modules() if type(m) is nn.Linear} >= {"lm_head"}
    assert dict(model.named_parameters()).keys() == weights.keys()  # same names: checkpoints and saved models
    assert all(p is weights[name] for name, p in model.named_parameters())  # same tensors: the optimizer's
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.config.pad_inner_dim  # any token count: the weight gradient's inner dimension is padded to 16
    assert said[-1] == "fp8: 8 decoder linear layers multiply in float8 (tensorwise scaling, torchao); eager " + (
        "(--no-compile): the float8 casts are not fused, expect it slower than bf16"
    )


@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_emulated_float8_full_training_step_stays_close_to_bf16(tiny_tokenizer, scaling):
    """Every trained weight gets a gradient, the loss moves by float8 rounding only (CPU emulation of the matmuls,
    bf16 weights as under bf16-sr master weights, an odd token count)."""
    pytest.importorskip("torchao.float8")
    from phi3v_tune.model.tiny import tiny_model

    batch = _batch(tiny_tokenizer)

    def step(fp8: bool):
        model = apply_strategy(tiny_model(tiny_tokenizer).to(torch.bfloat16).train(), "full")
        if fp8:
            assert len(fp8_module.convert_to_fp8(model, scaling, emulate=True)) == 8
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step(False)
    loss8, grads8 = step(True)
    assert loss8 == pytest.approx(loss, rel=2e-3)
    assert grads8.keys() == grads.keys() and any(n.endswith("mlp.gate_up_proj.weight") for n in grads8)
    errors = {name: float((grads8[name] - grads[name]).norm() / grads[name].norm()) for name in grads}
    assert max(errors.values()) < 0.15, errors
    assert max(errors.values()) > 0.01  # the matmuls did round to float8 (an unconverted model would pass the rest)


def test_emulated_float8_lora_step_reaches_the_adapters(tiny_tokenizer):
    pytest.importorskip("torchao.float8")
    from phi3v_tune.model.tiny import tiny_model

    batch = _batch(tiny_tokenizer)

    def step(fp8: bool):
        model = apply_strategy(tiny_model(tiny_tokenizer).to(torch.bfloat16).train(), "lora", bf16_adapters=True)
        for name, param in model.named_parameters():  # adapters that start at zero would hide a broken path
            if "lora_B" in name:
                nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(1))
        if fp8:
            fp8_module.convert_to_fp8(model, "tensorwise", emulate=True)
        model(**batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    grads, grads8 = step(False), step(True)
    assert len(grads8) == 2 * 2 * 4 + 2  # A and B of 4 projections in 2 layers, and lm_head's
    errors = {}
    for name in grads:
        assert grads8[name] is not None and torch.isfinite(grads8[name]).all(), name
        errors[name] = float((grads8[name].float() - grads[name].float()).norm() / grads[name].float().norm())
    assert 0.01 < max(errors.values()) < 0.15, errors  # float8 rounding in the bases' matmuls, nothing worse


# -- the quality gate's script (benchmarks/fp8_quality.py) -------------------------------------------------------------
def _quality_script():
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "fp8_quality.py"
    spec = importlib.util.spec_from_file_location("fp8_quality", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_gate_compares_every_step_after_warm_up():
    script = _quality_script()

    def run(losses, accuracy):
        return {"losses": [{"step": i + 1, "loss": v} for i, v in enumerate(losses)], "accuracy": accuracy}

    reference = run([10.0, 5.0, 2.0, 1.0, 0.5], 0.95)
    # step 1 (warm-up) is far off and not gated; step 4 is 1.5% off, within the gate
    close = script.compare(reference, run([12.0, 5.05, 1.99, 1.015, 0.5], 0.94), warmup=1)
    assert close["steps_compared"] == 4 and close["loss_gate"] and close["accuracy_gate"]
    assert close["max_rel_loss_diff"] == pytest.approx(0.015) and close["max_rel_loss_diff_step"] == 4
    assert close["accuracy_diff"] == pytest.approx(-0.01)
    far = script.compare(reference, run([10.0, 5.0, 2.0, 1.0, 0.53], 0.90), warmup=1)
    assert not far["loss_gate"] and far["steps_over_gate"] == [5] and far["max_rel_loss_diff"] == pytest.approx(0.06)
    assert not far["accuracy_gate"]  # 5 points
    assert far["losses_at_max"] == {"reference": 0.5, "run": 0.53}
    with pytest.raises(ValueError, match="no logged step after the 5 warm-up steps"):
        script.compare(reference, reference, warmup=5)


def test_quality_script_runs_on_the_cpu(tmp_path):
    """--tiny: the whole script on a tiny model (no fp8 on the CPU: the reference twice, which must agree exactly)."""
    import json

    script = _quality_script()
    out = tmp_path / "quality.json"
    report = script.main(["--tiny", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert list(report["runs"]) == ["bf16", "repeat"] and report["card"] == "CPU"
    for run in report["runs"].values():
        assert [e["step"] for e in run["losses"]] == [1, 2, 3] and run["fp8"] is None
        assert 0.0 <= run["accuracy"] <= 1.0
    verdict = report["comparisons"]["repeat"]
    assert verdict["steps_compared"] == 2 and verdict["max_rel_loss_diff"] == 0.0 and verdict["accuracy_diff"] == 0.0
    assert verdict["loss_gate"] and verdict["accuracy_gate"]
    with pytest.raises(SystemExit):  # the CPU cannot run --fp8
        script.parse_args(["--tiny", "--runs", "bf16,tensorwise"])
