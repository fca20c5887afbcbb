"""The Trainer's per-step bookkeeping from lists made once (train/step_boundary.py) changes no number and no mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from config_helpers import strategy
from transformers import Trainer

from phi3v_tune.config import TrainConfig
from phi3v_tune.data.synthetic import demo_split, write_jsonl
from phi3v_tune.model.tiny import build_tiny_tokenizer, tiny_model
from phi3v_tune.train.run import run_training
from phi3v_tune.train.step_boundary import ModuleTree, install, uninstall
from phi3v_tune.train.trainer import Phi3VTrainer


@pytest.fixture()
def lora_model():
    model = tiny_model(build_tiny_tokenizer())
    return strategy(model, TrainConfig(method="lora", lora_rank=4, cpu=True))


def test_train_restores_every_module_after_evaluation_and_is_the_class_method_otherwise(lora_model):
    tree = install(lora_model)
    lora_model.eval()  # the class's eval() calls self.train(False): the installed one
    assert not any(m.training for m in tree.modules)
    lora_model.train()
    assert all(m.training for m in tree.modules)
    inner = tree.modules[5]
    inner.eval()  # one submodule switched on its own: noticed too
    lora_model.train()
    assert inner.training
    uninstall(lora_model)
    assert "train" not in lora_model.__dict__ and "zero_grad" not in lora_model.__dict__


def test_zero_grad_and_the_clipping_list_see_every_gradient(lora_model):
    tree = ModuleTree(lora_model)
    ids = torch.tensor([[1, 5, 9, 4, 7]])
    lora_model(input_ids=ids, labels=ids).loss.backward()
    with_grad = [p for p in lora_model.parameters() if p.grad is not None]
    assert with_grad and all(any(p is q for q in tree.trainable) for p in with_grad)
    tree.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in with_grad)
    tree.zero_grad()
    assert all(p.grad is None for p in lora_model.parameters())


def run(tmp_path: Path, name: str, monkeypatch=None) -> dict:
    train, _ = demo_split(6, 1, seed=5, tasks=("colour", "compare"), as_png=True)
    data = write_jsonl(train, tmp_path / "data")
    cfg = TrainConfig(
        data=str(data), model="tiny", num_crops=1, output_dir=str(tmp_path / name), method="lora", lora_rank=4,
        batch_size=2, batch_size_per_device=1, max_steps=6, learning_rate=5e-3, max_grad_norm=0.05, eval_holdout=2,
        eval_steps=2, logging_steps=1, report_to="none", num_workers=0, progress=False, cpu=True, seed=3,
        save_checkpoints=False,
    )  # fmt: skip
    run_training(cfg)
    return json.loads((tmp_path / name / "metrics.json").read_text())


def test_training_numbers_equal_the_trainers_own_bookkeeping(tmp_path: Path, monkeypatch):
    """Gradient accumulation, active clipping (max_grad_norm 0.05), evaluation every 2 steps: every logged loss,
    gradient norm and evaluation loss, and the FLOP count, equal those of the Trainer's own methods."""
    ours = run(tmp_path, "ours")
    for name in ("training_step", "_clip_grad_norm", "floating_point_ops"):
        monkeypatch.setattr(Phi3VTrainer, name, getattr(Trainer, name))
    theirs = run(tmp_path, "theirs")

    def numbers(metrics: dict) -> list[tuple]:
        keys = ("loss", "grad_norm", "eval_loss", "total_flos")
        return [tuple(h.get(k) for k in keys) for h in metrics["log_history"]]

    assert any(h.get("grad_norm", 0) > 0.05 for h in ours["log_history"])  # clipping did act
    assert any("eval_loss" in h for h in ours["log_history"])
    assert numbers(ours) == numbers(theirs)
