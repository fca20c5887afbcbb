"""--optimizer-in-backward: every weight updated from its gradient hook and the gradient freed; the weights, the
schedule, the saved state and a resume are those of the ordinary optimizer step."""

from __future__ import annotations

import copy
import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phi3v_tune.config import TrainConfig
from phi3v_tune.data.synthetic import demo_split, write_jsonl
from phi3v_tune.model.tiny import build_tiny_tokenizer, tiny_model
from phi3v_tune.train.optim import AdamWSR, OptimizerInBackward
from phi3v_tune.train.run import run_training

IDS = [torch.tensor([[1, 5, 9, 4, 7, 3, 8]]), torch.tensor([[2, 6, 6, 1, 9, 5, 4]]), torch.tensor([[7, 7, 3, 2, 1]])]


def groups(model: torch.nn.Module) -> list[dict]:
    """Two groups, as the Trainer makes (weight decay on matrices, none on norms and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]  # fmt: skip


def train(model, make_optimizer, in_backward: bool, steps: int, state: dict | None = None) -> OptimizerInBackward:
    inner = make_optimizer(groups(model))
    optimizer = OptimizerInBackward(inner) if in_backward else inner
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
    for ids in IDS[:steps]:
        model(input_ids=ids, labels=ids).loss.backward()
        if in_backward:
            assert all(p.grad is None for p in model.parameters())  # used and freed during backward
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    optimizer.schedule = schedule
    return optimizer


@pytest.mark.parametrize(
    "dtype, make",
    [
        (torch.float32, lambda g: torch.optim.AdamW(g, lr=1e-2, eps=1e-7)),
        (torch.bfloat16, lambda g: AdamWSR(g, lr=1e-2, eps=1e-7, seed=3)),
    ],
    ids=["torch-adamw-fp32", "adamw-sr-bf16"],
)
def test_weights_equal_the_ordinary_step_bit_for_bit(dtype, make):
    base = tiny_model(build_tiny_tokenizer(), seed=4).to(dtype).train()
    ordinary, hooked = copy.deepcopy(base), copy.deepcopy(base)
    train(ordinary, make, in_backward=False, steps=3)
    optimizer = train(hooked, make, in_backward=True, steps=3)
    probe = copy.deepcopy(base)
    probe(input_ids=IDS[0], labels=IDS[0]).loss.backward()
    used = sum(p.grad is not None for p in probe.parameters())  # text-only batches: no CLIP gradient
    assert used and optimizer.steps_in_backward == 3 * used
    for (name, a), b in zip(ordinary.named_parameters(), hooked.parameters()):
        assert torch.equal(a, b), name
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)  # the schedule reached the inner optimizer


def test_saved_state_resumes_the_same_run():
    make = lambda g: torch.optim.AdamW(g, lr=1e-2)  # noqa: E731
    base = tiny_model(build_tiny_tokenizer(), seed=4).train()
    whole = copy.deepcopy(base)
    train(whole, make, in_backward=True, steps=3)
    first = copy.deepcopy(base)
    optimizer = train(first, make, in_backward=True, steps=2)
    state = {"optimizer": copy.deepcopy(optimizer.state_dict()), "schedule": optimizer.schedule.state_dict()}
    assert state["optimizer"].keys() == optimizer.inner.state_dict().keys() and state["optimizer"]["state"]
    resumed = copy.deepcopy(first)
    IDS.insert(0, IDS.pop(2))  # the resumed run's first step is the third batch
    try:
        again = train(resumed, make, in_backward=True, steps=1, state=state)
    finally:
        IDS.append(IDS.pop(0))
    assert again.param_groups is again.inner.param_groups  # re-shared after load_state_dict
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_a_finished_run_frees_its_weights_and_state():
    """The hooks hold the optimizer weakly: once the model and optimizer are dropped, the weights and AdamW state go
    with them (a hook -> optimizer -> parameter cycle kept 21 GiB alive into a benchmark's next run). A hook whose
    optimizer is gone updates nothing."""
    model = torch.nn.Linear(64, 64)
    optimizer = OptimizerInBackward(torch.optim.AdamW(model.parameters(), lr=1e-2))
    model(torch.randn(2, 64)).sum().backward()
    assert optimizer.steps_in_backward == 2 and len(optimizer.state) == 2
    alive = [weakref.ref(x) for x in (model, model.weight, optimizer, optimizer.inner)]
    del model, optimizer
    gc.collect()
    assert [ref() is None for ref in alive] == [True] * 4

    model = torch.nn.Linear(4, 4)
    optimizer = OptimizerInBackward(torch.optim.AdamW(model.parameters(), lr=1e-2))
    before = model.weight.detach().clone()
    del optimizer
    gc.collect()
    model(torch.randn(2, 4)).sum().backward()
    assert torch.equal(model.weight, before) and model.weight.grad is not None  # an ordinary backward now


def test_the_flag_refuses_what_it_cannot_do():
    def cfg(**kw):
        base = {"batch_size": 2, "batch_size_per_device": 2, "max_grad_norm": 0.0}
        return TrainConfig(data="x.jsonl", optimizer_in_backward=True, **{**base, **kw})

    assert cfg().validate().optimizer_in_backward
    for kw, need in (
        ({"max_grad_norm": 1.0}, "--max-grad-norm 0"),
        ({"batch_size": 4}, "no gradient accumulation"),
        ({"deepspeed": "configs/deepspeed/zero2.json"}, "no --deepspeed or --fsdp"),
        ({"fp16": True}, "no --fp16"),
        ({"skip_nonfinite": 2}, "--skip-nonfinite 0"),
    ):
        with pytest.raises(ValueError, match="--optimizer-in-backward needs .*" + need):
            cfg(**kw).validate()


def run(tmp_path: Path, name: str, in_backward: bool, method: str) -> tuple[dict, dict]:
    train_rows, _ = demo_split(6, 1, seed=5, tasks=("colour", "compare"), as_png=True)
    data = write_jsonl(train_rows, tmp_path / "data")
    cfg = TrainConfig(
        data=str(data), model="tiny", num_crops=1, output_dir=str(tmp_path / name), method=method, lora_rank=4,
        batch_size=2, batch_size_per_device=2, max_steps=4, learning_rate=5e-3, max_grad_norm=0.0, warmup_steps=1,
        logging_steps=1, report_to="none", num_workers=0, progress=False, cpu=True, seed=3, save_steps=2,
        optimizer_in_backward=in_backward, gradient_checkpointing=True,
    )  # fmt: skip
    run_training(cfg)
    metrics = json.loads((tmp_path / name / "metrics.json").read_text())
    final = tmp_path / name / "final"
    weights = {}
    for f in sorted(final.glob("*.safetensors")):
        weights.update(load_file(f))
    return metrics, weights


@pytest.mark.parametrize("method", ["freeze-vision", "lora"])
def test_training_run_equals_the_ordinary_step(tmp_path: Path, method):
    """Through the Trainer (packed pairs, checkpointing, a checkpoint at step 2): the same losses, learning rates
    and final weights as the ordinary optimizer step without clipping."""
    ours, ours_weights = run(tmp_path, "hooked", True, method)
    theirs, their_weights = run(tmp_path, "ordinary", False, method)

    def numbers(metrics: dict) -> list[tuple]:
        return [(h.get("loss"), h.get("learning_rate")) for h in metrics["log_history"] if "loss" in h]

    assert len(numbers(ours)) == 4 and numbers(ours) == numbers(theirs)
    assert ours_weights.keys() == their_weights.keys() and ours_weights
    for key in ours_weights:
        torch.testing.assert_close(ours_weights[key], their_weights[key], rtol=0, atol=0, msg=key)
    assert (tmp_path / "hooked" / "checkpoint-2" / "optimizer.pt").exists()


def test_several_processes_are_refused(tmp_path: Path, monkeypatch):
    """Under DDP each rank would update its weights from its own gradients before they are averaged."""
    from phi3v_tune.train.trainer import Phi3VTrainer, Phi3VTrainingArguments

    TrainConfig(data="x.jsonl", batch_size=1, max_grad_norm=0.0, optimizer_in_backward=True).validate()
    args = Phi3VTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_grad_norm=0.0, optimizer_in_backward=True
    )
    trainer = Phi3VTrainer(model=tiny_model(build_tiny_tokenizer()), args=args)
    monkeypatch.setattr(Phi3VTrainingArguments, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="--optimizer-in-backward runs in one process"):
        trainer.create_optimizer()


def test_bf16_sr_run_in_backward_resumes_exactly_and_equals_the_ordinary_step(tmp_path: Path):
    """full fine-tuning with bf16 weights (AdamWSR): stop at step 2 and resume gives the uninterrupted run's weights,
    which are those of the ordinary optimizer step."""
    rows, _ = demo_split(2, 0, seed=5, tasks=("colour", "shape"), as_png=True)
    data = write_jsonl(rows, tmp_path / "data")

    def cfg(out: Path, in_backward: bool = True, **kw) -> TrainConfig:
        return TrainConfig(data=str(data), model="tiny", num_crops=1, output_dir=str(out), batch_size=2,
                           batch_size_per_device=2, learning_rate=1e-3, warmup_steps=1, seed=3, save_steps=2,
                           logging_steps=1, report_to="none", num_workers=0, progress=False, cpu=True,
                           master_weights="bf16-sr", max_steps=4, max_grad_norm=0.0,
                           optimizer_in_backward=in_backward, **kw)  # fmt: skip

    run_training(cfg(tmp_path / "straight"))
    run_training(cfg(tmp_path / "resumed", stop_at_step=2))
    run_training(cfg(tmp_path / "resumed", resume="latest"))
    run_training(cfg(tmp_path / "ordinary", in_backward=False))
    a, b, c = (
        load_file(tmp_path / name / "final" / "model.safetensors") for name in ("straight", "resumed", "ordinary")
    )
    base = load_file(tmp_path / "straight" / "base-tiny" / "model.safetensors")
    assert any(not torch.equal(a[k], base[k].to(a[k].dtype)) for k in a if "layers.0.mlp" in k)
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k
