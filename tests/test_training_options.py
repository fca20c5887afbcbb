"""Training options users of other tools expect: a learning rate per model part, DoRA / rsLoRA adapters, and
experiment trackers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from config_helpers import strategy
from PIL import Image
from safetensors.torch import load_file

from phi3v_tune.config import TrainConfig
from phi3v_tune.data.synthetic import demo_split, write_jsonl
from phi3v_tune.model.tiny import tiny_model
from phi3v_tune.train.run import run_training
from phi3v_tune.train.strategies import parameter_part
from phi3v_tune.train.trainer import Phi3VTrainer, Phi3VTrainingArguments

RATES = {"language": 1e-3, "vision": 3e-2, "projector": 1e-2}


def trainer_for(model, tmp_path: Path, **args) -> Phi3VTrainer:
    arguments = Phi3VTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], learning_rate=RATES["language"], weight_decay=0.1,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-7,
        part_learning_rates={"vision": RATES["vision"], "projector": RATES["projector"]}, **args,
    )  # fmt: skip
    return Phi3VTrainer(model=model, args=arguments)


def test_parts_are_named_by_their_place_in_the_model():
    assert parameter_part("model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1.weight") == (
        "vision"
    )
    assert parameter_part("base_model.model.model.vision_embed_tokens.img_projection.0.lora_A.default.weight") == (
        "projector"
    )
    assert parameter_part("model.vision_embed_tokens.glb_GN") == "projector"
    assert parameter_part("model.vision_embed_tokens.sub_GN") == "projector"
    assert parameter_part("model.layers.0.self_attn.qkv_proj.weight") == "language"
    assert parameter_part("lm_head.weight") == "language" and parameter_part("model.embed_tokens.weight") == "language"


@pytest.mark.parametrize("method", ["full", "lora"])
def test_each_part_has_its_own_group_and_rate(tiny_tokenizer, tmp_path, method):
    """The optimizer's groups hold exactly each part's trainable parameters (decayed and not), at the part's rate."""
    cfg = TrainConfig(method=method, lora_rank=4, lora_vision=True, vision_lr=RATES["vision"])
    model = strategy(tiny_model(tiny_tokenizer, seed=1), cfg)
    optimizer = trainer_for(model, tmp_path).create_optimizer()
    by_id = {id(p): n for n, p in model.named_parameters()}
    seen: dict[str, set[str]] = {part: set() for part in RATES}
    for group in optimizer.param_groups:
        names = {by_id[id(p)] for p in group["params"]}
        assert {parameter_part(n) for n in names} == {group["part"]}
        assert group["lr"] == RATES[group["part"]]
        assert group["weight_decay"] in (0.0, 0.1)
        seen[group["part"]] |= names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*seen.values()) == trainable
    for part in RATES:
        assert seen[part] == {n for n in trainable if parameter_part(n) == part} and seen[part], part


def hand_adamw(p: torch.Tensor, g: torch.Tensor, lr: float, wd: float) -> torch.Tensor:
    """AdamW's first step, written out: decoupled decay, bias-corrected moments (m = (1-b1) g, v = (1-b2) g^2)."""
    b1, b2, eps = 0.9, 0.95, 1e-7
    m_hat = ((1 - b1) * g) / (1 - b1)
    v_hat = ((1 - b2) * g * g) / (1 - b2)
    return p * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)


@pytest.mark.parametrize("path", ["fp32", "bf16-sr", "in-backward"])
def test_a_step_moves_each_part_by_its_rate(tiny_tokenizer, tmp_path, path):
    """One optimizer step from known gradients: every parameter moves as a hand AdamW step at its part's rate (fp32
    exactly; bf16 weights with stochastic rounding within one bf16 spacing)."""
    torch.manual_seed(0)
    model = strategy(tiny_model(tiny_tokenizer, seed=2), TrainConfig(method="full"))
    extra = {}
    if path == "bf16-sr":
        model = model.to(torch.bfloat16)
        extra["master_weights"] = "bf16-sr"
    if path == "in-backward":
        extra.update(optimizer_in_backward=True, max_grad_norm=0.0)
    trainer = trainer_for(model, tmp_path, **extra)
    optimizer = trainer.create_optimizer()
    decay = set(trainer.get_decay_parameter_names(model))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().float().clone() for n, p in params.items()}
    grads = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, (n, p) in enumerate(params.items())}  # fmt: skip
    if path == "in-backward":  # gradients arrive in backward: each parameter is updated as its gradient completes
        loss = sum((p.float() * grads[n]).sum() for n, p in params.items())
        loss.backward()
    else:
        for n, p in params.items():
            p.grad = grads[n].to(p.dtype)
        optimizer.step()
    moved = {part: 0 for part in RATES}
    for n, p in params.items():
        part = parameter_part(n)
        g = grads[n].to(p.dtype).float()
        want = hand_adamw(before[n], g, RATES[part], 0.1 if n in decay else 0.0)
        if path == "bf16-sr":
            spacing = 2.0 ** (torch.floor(torch.log2(want.abs().clamp(min=1e-30))) - 7)
            assert ((p.detach().float() - want).abs() <= spacing).all(), n
        else:
            torch.testing.assert_close(p.detach().float(), want, rtol=1e-6, atol=1e-7, msg=n)
        moved[part] += 1
    assert all(moved.values())


def train_small(tmp_path: Path, out: str, **kw) -> dict:
    rows, _ = demo_split(4, 0, seed=3, tasks=("colour", "shape"), as_png=True)
    data = write_jsonl(rows, tmp_path / "data")
    cfg = TrainConfig(
        data=str(data), model="tiny", num_crops=1, output_dir=str(tmp_path / out), batch_size=2,
        batch_size_per_device=1, warmup_steps=1, seed=5, logging_steps=1, report_to="none", num_workers=0,
        progress=False, cpu=True, max_steps=4, save_steps=2, learning_rate=1e-3, vision_lr=5e-3,
        projector_lr=2e-3, **kw,
    )  # fmt: skip
    return run_training(cfg)


def test_part_rates_survive_a_resume_exactly(tmp_path):
    """4 steps straight equal 2 steps + resume + 2 steps (weights and the learning rates logged per step)."""
    straight = train_small(tmp_path, "straight")
    train_small(tmp_path, "resumed", stop_at_step=2)
    resumed = train_small(tmp_path, "resumed", resume="latest")
    rates = [(h["step"], h["learning_rate"]) for h in straight["log_history"] if "loss" in h]
    assert rates == [(h["step"], h["learning_rate"]) for h in resumed["log_history"] if "loss" in h]
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    state = torch.load(tmp_path / "resumed" / "checkpoint-4" / "optimizer.pt", weights_only=False)
    peaks = {g["part"]: g["initial_lr"] for g in state["param_groups"]}
    assert peaks == {"language": 1e-3, "vision": 5e-3, "projector": 2e-3}


# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dora", "rslora"])
def test_lora_variants_train_and_merge_to_the_adapter_model(tiny_tokenizer, tiny_processor, variant):
    """--lora-variant dora / rslora reach PEFT; the merged model's logits equal the adapter model's (fp32)."""
    cfg = TrainConfig(method="lora", lora_rank=4, lora_variant=variant, lora_vision=True)
    model = strategy(tiny_model(tiny_tokenizer, seed=4), cfg)
    peft_cfg = model.peft_config["default"]
    assert (peft_cfg.use_dora, peft_cfg.use_rslora) == (variant == "dora", variant == "rslora")
    if variant == "dora":
        assert any("lora_magnitude_vector" in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():  # adapters that change the output (B is zero at initialisation)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    text = "<|user|>\n<|image_1|>\nWhat colour?<|end|>\n<|assistant|>\n"
    inputs = tiny_processor(text=text, images=[Image.new("RGB", (500, 340), "red")], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        adapted = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
        merged = model.merge_and_unload()(**inputs).logits
    assert (adapted - base).abs().max() > 1e-3  # the adapters matter, so the comparison below means something
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_rslora_scales_by_the_square_root_of_the_rank(tiny_tokenizer):
    cfg = TrainConfig(method="lora", lora_rank=16, lora_alpha=32, lora_variant="rslora")
    model = strategy(tiny_model(tiny_tokenizer, seed=4), cfg)
    layer = model.base_model.model.model.layers[0].self_attn.qkv_proj
    assert layer.scaling["default"] == pytest.approx(32 / math.sqrt(16))


def test_a_lora_variant_needs_a_lora_method():
    with pytest.raises(ValueError, match="--lora-variant dora needs --method lora or qlora"):
        TrainConfig(method="full", lora_variant="dora").validate()


# --------------------------------------------------------------------------------------------------------------------
def test_trackers_default_to_tensorboard_and_others_need_their_package(tmp_path, monkeypatch):
    assert TrainConfig().trackers() == ["tensorboard"]
    assert TrainConfig(report_to="none").trackers() == []
    assert TrainConfig(report_to="tensorboard, wandb").trackers() == ["tensorboard", "wandb"]
    with pytest.raises(ValueError, match="unknown tracker.*comet"):
        TrainConfig(report_to="comet").validate()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "mlflow") else real(name, *a)
    )
    for tracker in ("wandb", "mlflow"):
        with pytest.raises(
            ValueError, match=f"--report-to {tracker} needs the {tracker} package: pip install {tracker}"
        ):
            TrainConfig(report_to=f"tensorboard,{tracker}").check_environment()
    TrainConfig(report_to="tensorboard").check_environment()


def test_tensorboard_logs_the_run(tmp_path):
    rows, _ = demo_split(2, 0, seed=3, tasks=("colour",), as_png=True)
    data = write_jsonl(rows, tmp_path / "data")
    cfg = TrainConfig(data=str(data), model="tiny", num_crops=1, output_dir=str(tmp_path / "tb"), batch_size=1,
                      max_steps=2, warmup_steps=0, logging_steps=1, num_workers=0, progress=False, cpu=True,
                      save_checkpoints=False)  # fmt: skip
    run_training(cfg)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tmp_path / "tb" / "runs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"train/loss", "train/learning_rate"} <= set(acc.Tags()["scalars"])
    assert len(acc.Scalars("train/loss")) == 2


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(method="lora", vision_lr=1e-4), "--vision-lr applies to a part that trains, but with --method lora it "
                                              "has no adapters without --lora-vision"),
        (dict(method="qlora", projector_lr=1e-4), "--projector-lr applies to a part that trains, but with --method "
                                                  "qlora it has no adapters without --lora-vision"),
        (dict(method="freeze-vision", vision_lr=1e-4), "--vision-lr applies to a part that trains, but --method "
                                                       "freeze-vision freezes the CLIP tower"),
        (dict(method="freeze-vision", freeze_projector=True, projector_lr=1e-4),
         "--projector-lr applies to a part that trains, but --freeze-projector freezes the projector"),
    ],
)  # fmt: skip
def test_a_rate_for_a_part_that_does_not_train_is_refused(settings, message):
    with pytest.raises(ValueError) as err:
        TrainConfig(data="x.jsonl", **settings).validate()
    assert str(err.value) == message
    # the same part trains with adapters on it, or under full fine-tuning: accepted
    TrainConfig(data="x.jsonl", method="lora", lora_vision=True, vision_lr=1e-4, projector_lr=1e-4).validate()
    TrainConfig(data="x.jsonl", method="freeze-vision", projector_lr=1e-4).validate()
