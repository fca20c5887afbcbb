"""DeepSpeed ZeRO-2/3 end to end on the CPU: 2 gloo processes, tiny model (DeepSpeed's CPU accelerator).

Skipped where DeepSpeed is not installed (it is optional: `DS_BUILD_OPS=0 pip install deepspeed`). What a user
relies on: a ZeRO run ends cleanly, ZeRO-3 writes the final model consolidated in the published layout, a ZeRO-3
checkpoint resumes on the same number of processes and refuses another number with a clear message, and a ZeRO-3
step where one rank has a text-only sample does not hang (every rank runs the vision tower).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

from launch import REPO, TINY_CPU_FLAGS, cpu_env, torchrun  # noqa: E402


@pytest.fixture(scope="module")
def ds_data(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(tiny base model, 4 image samples, 1 image sample + 3 text-only samples)."""
    from phi3v_tune.data.synthetic import demo_split, write_jsonl
    from phi3v_tune.model.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("ds")
    train, _ = demo_split(4, 0, seed=1, tasks=("colour",), as_png=True)
    images = write_jsonl(train, root / "data")
    # one image sample among text-only ones: whatever the order, the step that trains it has a text-only rank
    first = json.loads(images.read_text().splitlines()[0])
    mixed = [first] + [
        {"id": f"text-{i}", "conversations": [{"user": "Say a colour.", "assistant": "red"}]} for i in range(3)
    ]
    mixed_file = images.parent / "mixed.jsonl"
    mixed_file.write_text("".join(json.dumps(x) + "\n" for x in mixed))
    return save_tiny_checkpoint(root / "tiny", num_crops=1), images, mixed_file


def _train(model: Path, data: Path, out: Path, config: str, port: int, nproc: int = 2, *extra: str):
    cmd = [*torchrun(nproc, port), "-m", "phi3v_tune", "train", *TINY_CPU_FLAGS, "--model", str(model), "--data",
           str(data), "--method", "full", "--batch-size", "2", "--batch-size-per-device", "1", "--learning-rate",
           "1e-3", "--warmup-steps", "0", "--output-dir", str(out), "--deepspeed",
           str(REPO / "configs" / "deepspeed" / config), *extra]  # fmt: skip
    return subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=400)


EVALUATED = ("--eval-steps", "1", "--metric", "accuracy", "--eval-max-new-tokens", "2")


def test_zero2_run_with_evaluation_ends_cleanly(ds_data, tmp_path):
    """The loss before training is evaluated once the engine exists (an engine first built for evaluation is an
    inference engine, which ZeRO-2 refuses), then during and after, with the task metric by generation."""
    model, data, mixed = ds_data
    out = tmp_path / "z2"
    proc = _train(model, data, out, "zero2.json", 29761, 2, "--max-steps", "2", "--no-save-checkpoints",
                  "--eval-data", str(mixed), *EVALUATED)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert torch.isfinite(torch.tensor(metrics["train"]["train_loss"]))
    assert metrics["eval_before"]["step"] == 0 and metrics["eval_after"]["eval_loss"] > 0
    assert [e["when"] for e in metrics["task_metric"]] == ["before", "during", "after"]


def test_deepspeed_without_a_launcher_runs_as_one_process(ds_data, tmp_path):
    """`phi3v-tune train --deepspeed zero2.json` alone: no torchrun, no MPI."""
    model, data, _ = ds_data
    cmd = [sys.executable, "-m", "phi3v_tune", "train", *TINY_CPU_FLAGS, "--model", str(model), "--data", str(data),
           "--batch-size", "1", "--max-steps", "1", "--output-dir", str(tmp_path / "one"), "--no-save-checkpoints",
           "--deepspeed", str(REPO / "configs" / "deepspeed" / "zero2.json")]  # fmt: skip
    env = {k: v for k, v in cpu_env().items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["steps"] == 1


def test_zero3_consolidated_final_model_and_resume(ds_data, tmp_path):
    model, data, _ = ds_data
    out = tmp_path / "z3"
    proc = _train(model, data, out, "zero3.json", 29762, 2, "--max-steps", "2", "--save-steps", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    final, base = load_file(out / "final" / "model.safetensors"), load_file(model / "model.safetensors")
    assert final.keys() == base.keys()  # the published key names, every tensor whole (gathered from the shards)
    assert all(final[k].shape == base[k].shape for k in base)
    assert any(not torch.equal(final[k].float(), base[k].float()) for k in base)  # it trained
    # same number of processes: continues to step 4
    proc = _train(model, data, out, "zero3.json", 29763, 2, "--max-steps", "4", "--save-steps", "1", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    # another number of processes: a clear error, nothing trained
    proc = _train(model, data, out, "zero3.json", 29764, 1, "--max-steps", "6", "--resume")
    assert proc.returncode != 0
    assert "was saved by 2 GPU(s)" in proc.stdout + proc.stderr and "universal" in proc.stdout + proc.stderr
    assert not (out / "checkpoint-5").exists()


def test_zero3_text_only_samples_on_some_ranks_do_not_hang(ds_data, tmp_path):
    """Training and evaluation (loss and generation) with some ranks holding text-only samples."""
    model, _, mixed = ds_data
    out = tmp_path / "mixed"
    proc = _train(model, mixed, out, "zero3.json", 29765, 2, "--max-steps", "2", "--no-save-checkpoints",
                  "--eval-data", str(mixed), *EVALUATED)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]  # (a hang would end in the 400 s timeout instead)
    report = json.loads((out / "epoch_reports.jsonl").read_text().splitlines()[0])
    assert report["trained"] == 4  # 2 steps x 2 ranks: the image sample and the three text-only ones


def test_lora_under_zero3_resumes_and_saves_a_whole_adapter(ds_data, tmp_path):
    """ZeRO-3 partitions the adapters too: the checkpoint resumes, and the final adapter holds whole tensors."""
    model, data, _ = ds_data
    out = tmp_path / "lora"
    lora = ("--method", "lora", "--lora-rank", "4", "--save-steps", "1")
    proc = _train(model, data, out, "zero3.json", 29766, 2, "--max-steps", "2", *lora)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _train(model, data, out, "zero3.json", 29767, 2, "--max-steps", "4", "--resume", *lora)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    a_shapes = {tuple(v.shape) for k, v in adapter.items() if "lora_A" in k}
    assert (4, hidden) in a_shapes and all(v.numel() > 0 for v in adapter.values())
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: it trained
