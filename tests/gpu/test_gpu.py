"""GPU tests (skipped without CUDA): bf16 + sdpa on the GPU agrees with fp32 on the CPU; QLoRA builds and trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from config_helpers import strategy
from PIL import Image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_sdpa_on_gpu_matches_fp32_cpu(tiny_tokenizer, tiny_processor):
    from phi3v_tune.model.tiny import tiny_model

    model = tiny_model(tiny_tokenizer, seed=3)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (400, 700, 3), dtype=np.uint8))
    text = tiny_processor.apply_chat_template([{"role": "user", "content": "<|image_1|>\nWhat is shown?"}])
    inputs = tiny_processor(text=text, images=[image])
    with torch.no_grad():
        ref = model(**inputs).logits
        gpu = model.to("cuda", torch.bfloat16)
        got = gpu(**{k: v.to("cuda") for k, v in inputs.items()}).logits.float().cpu()
    assert float((got - ref).norm() / ref.norm()) < 3e-2


def test_qlora_strategy_quantizes_the_language_model(tiny_tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    from phi3v_tune.config import TrainConfig
    from phi3v_tune.model.tiny import save_tiny_checkpoint
    from phi3v_tune.train.model_setup import load_model
    from phi3v_tune.train.runtime import Runtime
    from phi3v_tune.train.strategies import count_parameters

    folder = save_tiny_checkpoint(tmp_path / "tiny", num_crops=1)
    cfg = TrainConfig(method="qlora", bf16=True, lora_rank=4)
    model = strategy(load_model(str(folder), Runtime.resolve(cfg), cfg.method), cfg)
    names = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in names
    counts = count_parameters(model)
    assert 0 < counts.trainable < counts.total


def test_fp16_loss_scaling_skips_overflowing_steps(tmp_path, monkeypatch):
    """fp16: fp32 master weights + GradScaler; an overflowing step lowers the scale instead of corrupting weights."""
    from safetensors.torch import load_file

    from phi3v_tune.config import TrainConfig
    from phi3v_tune.data.synthetic import demo_split, write_jsonl
    from phi3v_tune.train import trainer as trainer_module
    from phi3v_tune.train.run import run_training

    train, _ = demo_split(4, 0, seed=1, tasks=("colour",), as_png=True)
    data = write_jsonl(train, tmp_path / "data")
    original = trainer_module.Trainer.compute_loss
    calls = {"n": 0}

    def huge_first_loss(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        calls["n"] += 1
        return loss * 1e30 if calls["n"] == 1 else loss  # inf in fp16 gradients

    monkeypatch.setattr(trainer_module.Trainer, "compute_loss", huge_first_loss)
    out = tmp_path / "run"
    cfg = TrainConfig(
        data=str(data),
        model="tiny",
        num_crops=1,
        output_dir=str(out),
        max_steps=3,
        batch_size=1,
        fp16=True,
        warmup_steps=0,
        report_to="none",
        num_workers=0,
        progress=False,
        save_steps=3,
    )
    run_training(cfg)
    scaler = torch.load(out / "checkpoint-3" / "scaler.pt", weights_only=False)
    assert scaler["scale"] < 2.0**16  # the overflow halved the scale
    assert all(torch.isfinite(v).all() for v in load_file(out / "final" / "model.safetensors").values())


@pytest.mark.parametrize("weights", ["auto", "fp32"])
def test_qlora_trains_bf16_adapters_by_default_and_fp32_on_request(tmp_path, weights, built_optimizers):
    """qlora on a GPU: auto = bf16-sr (bf16 adapters, frozen weights left in bf16, AdamWSR, no autocast); fp32 =
    PEFT's k-bit preparation (fp32 adapters and upcast frozen weights under autocast). Both train."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    from phi3v_tune.config import TrainConfig
    from phi3v_tune.data.synthetic import demo_split, write_jsonl
    from phi3v_tune.train.optim import AdamWSR
    from phi3v_tune.train.run import run_training

    train, _ = demo_split(4, 0, seed=1, tasks=("colour",), as_png=True)
    data = write_jsonl(train, tmp_path / "data")
    cfg = TrainConfig(data=str(data), model="tiny", num_crops=1, output_dir=str(tmp_path / "run"), max_steps=3,
                      batch_size=2, bf16=True, method="qlora", lora_rank=4, learning_rate=1e-2, warmup_steps=0,
                      report_to="none", num_workers=0, progress=False, master_weights=weights)  # fmt: skip
    metrics = run_training(cfg)
    opt, model = built_optimizers[0]
    trained = [p for g in opt.param_groups for p in g["params"]]
    vision = [p for n, p in model.named_parameters() if "img_processor" in n]
    if weights == "auto":
        assert isinstance(opt, AdamWSR) and all(p.dtype == torch.bfloat16 for p in trained)
        assert all(p.dtype == torch.bfloat16 for p in vision)
    else:
        assert not isinstance(opt, AdamWSR) and all(p.dtype == torch.float32 for p in trained)
        assert all(p.dtype == torch.float32 for p in vision)
    assert np.isfinite(metrics["train"]["train_loss"])
    adapter = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    assert any(bool(v.abs().sum() > 0) for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it moved


def test_sdpa_backend_flash_avoids_cudnn_attention_with_the_same_loss(tiny_tokenizer, tiny_processor):
    """--sdpa-backend flash: no cuDNN attention op runs (forward or backward), and the loss and gradients agree
    with the cuDNN run within bf16 noise."""
    from torch.profiler import ProfilerActivity, profile

    from phi3v_tune.model.tiny import tiny_model
    from phi3v_tune.train.run import select_sdpa_backend

    text = tiny_processor.apply_chat_template([{"role": "user", "content": "<|image_1|>\nWhat is shown?"}]) + "a dog"
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (400, 700, 3), dtype=np.uint8))
    inputs = {k: v.to("cuda") for k, v in tiny_processor(text=text, images=[image]).items()}
    labels = inputs["input_ids"].clamp(min=0)
    labels[:, :-3] = -100
    results = {}
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        for backend in ("cudnn", "flash"):
            select_sdpa_backend(True, backend)
            model = tiny_model(tiny_tokenizer, seed=3).to("cuda", torch.bfloat16).train()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                loss = model(**inputs, labels=labels).loss
                loss.backward()
            ops = {e.key for e in prof.key_averages()}
            grad = model.model.layers[0].self_attn.qkv_proj.weight.grad.float()
            results[backend] = (float(loss), grad, any("cudnn_attention" in op for op in ops))
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
    assert results["flash"][2] is False
    assert abs(results["flash"][0] - results["cudnn"][0]) < 2e-2 * abs(results["cudnn"][0])
    g_flash, g_cudnn = results["flash"][1], results["cudnn"][1]
    assert float((g_flash - g_cudnn).norm() / g_cudnn.norm()) < 5e-2


def test_optimizer_in_backward_on_gpu_equals_the_ordinary_step(tiny_tokenizer):
    """bf16 weights with AdamWSR (its Triton kernel on the GPU): stepping each weight from its gradient hook gives
    the weights of the ordinary optimizer step, bit for bit, and no gradient is left after backward."""
    import copy

    from phi3v_tune.model.tiny import tiny_model
    from phi3v_tune.train.optim import AdamWSR, OptimizerInBackward

    base = tiny_model(tiny_tokenizer, seed=4).to("cuda", torch.bfloat16).train()
    ids = torch.tensor([[1, 5, 9, 4, 7, 3, 8, 2]], device="cuda")
    results = []
    for in_backward in (False, True):
        model = copy.deepcopy(base)
        inner = AdamWSR([p for p in model.parameters() if p.requires_grad], lr=1e-3, seed=3)
        optimizer = OptimizerInBackward(inner) if in_backward else inner
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            if in_backward:
                assert all(p.grad is None for p in model.parameters())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_lora_run_with_evaluation_on_gpu(tmp_path):
    """The default GPU path (bf16, compiled layers, bf16-sr adapters) with the loss evaluated before training by the
    Trainer, the task metric before / during / after, and adapter-only checkpoints."""
    import json

    from safetensors.torch import load_file

    from phi3v_tune.config import TrainConfig
    from phi3v_tune.data.synthetic import demo_split, write_jsonl
    from phi3v_tune.train.run import run_training

    train, _ = demo_split(4, 0, seed=1, tasks=("colour",), as_png=True)
    data = write_jsonl(train, tmp_path / "data")
    out = tmp_path / "run"
    cfg = TrainConfig(data=str(data), model="tiny", num_crops=1, output_dir=str(out), max_steps=3, batch_size=1,
                      method="lora", lora_rank=4, learning_rate=1e-2, warmup_steps=0, report_to="none",
                      num_workers=0, progress=False, eval_holdout=2, metric="accuracy", eval_steps=2,
                      eval_max_new_tokens=3, logging_steps=2, save_steps=2)  # fmt: skip
    metrics = run_training(cfg)
    assert metrics["eval_before"]["step"] == 0 and np.isfinite(metrics["eval_after"]["eval_loss"])
    assert [(e["step"], e["when"]) for e in metrics["task_metric"]] == [(0, "before"), (2, "during"), (3, "after")]
    assert [e["step"] for e in metrics["log_history"] if "loss" in e] == [1, 2, 3]
    for folder in (out / "checkpoint-2", out / "final"):
        keys = load_file(folder / "adapter_model.safetensors").keys()
        assert keys and all("lora_" in k for k in keys), folder
    assert len((out / "eval_metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
